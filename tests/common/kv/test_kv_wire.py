"""KV wire format: raw little-endian bytes, bit-exact round trips, clear errors, CRC-32."""

import pytest
import torch

from common.basics.errors import InvalidArgument
from common.kv import wire as kv_wire

_SAME_SIZE_INT = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}


def kv_tensor(dtype: torch.dtype) -> torch.Tensor:
    values = torch.randn(3, 2, 4, generator=torch.Generator().manual_seed(0)) * 1e3  # (tokens, kv_heads, head_dim)
    values[0, 0, :4] = torch.tensor([float("nan"), float("inf"), float("-inf"), -0.0])
    return values.to(dtype)


def bits(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.view(_SAME_SIZE_INT[tensor.dtype])


@pytest.mark.parametrize("dtype_name", ["float32", "float16", "bfloat16"])
def test_round_trip_is_bit_exact(dtype_name):
    tensor = kv_tensor(kv_wire.DTYPES[dtype_name])
    data = kv_wire.to_bytes(tensor)
    assert len(data) == tensor.numel() * tensor.element_size()
    restored = kv_wire.from_bytes(data, dtype_name, tuple(tensor.shape))
    assert restored.dtype == tensor.dtype
    assert restored.shape == tensor.shape
    assert torch.equal(bits(restored), bits(tensor))


def test_non_contiguous_tensor_is_sent_in_row_major_order():
    tensor = kv_tensor(torch.float32).transpose(0, 2)
    restored = kv_wire.from_bytes(kv_wire.to_bytes(tensor), "float32", tuple(tensor.shape))
    assert torch.equal(bits(restored), bits(tensor.contiguous()))


def test_bytes_are_little_endian():
    assert kv_wire.to_bytes(torch.tensor([1.0], dtype=torch.float32)) == b"\x00\x00\x80\x3f"
    assert kv_wire.to_bytes(torch.tensor([1.0], dtype=torch.bfloat16)) == b"\x80\x3f"


def test_restored_tensor_does_not_alias_the_payload():
    data = kv_wire.to_bytes(torch.ones(4))
    restored = kv_wire.from_bytes(data, "float32", (4,))
    restored.add_(1)
    assert kv_wire.from_bytes(data, "float32", (4,)).tolist() == [1.0] * 4


@pytest.mark.parametrize("delta", [-1, 1, -4])
def test_wrong_payload_length_is_an_invalid_argument(delta):
    data = kv_wire.to_bytes(torch.zeros(2, 3, dtype=torch.float16))
    with pytest.raises(InvalidArgument, match=rf"has {len(data) + delta} bytes.*\(2, 3\) of float16 needs 12"):
        kv_wire.from_bytes(data[:delta] if delta < 0 else data + b"\x00", "float16", (2, 3))


def test_unknown_dtype_is_an_invalid_argument_listing_the_known_ones():
    data = kv_wire.to_bytes(torch.zeros(4, dtype=torch.float32))
    with pytest.raises(InvalidArgument, match=r"'int4' is unknown.*bfloat16.*float16.*float32.*fp8.*int8"):
        kv_wire.from_bytes(data, "int4", (4,))


def test_checksum_changes_when_one_byte_of_key_or_value_changes():
    key = kv_wire.to_bytes(kv_tensor(torch.float16))
    value = kv_wire.to_bytes(kv_tensor(torch.float16) * 2)
    original = kv_wire.checksum(key, value)
    assert kv_wire.checksum(key, value) == original
    for index in (0, len(key) // 2, len(key) - 1):
        flipped_key = key[:index] + bytes([key[index] ^ 0x01]) + key[index + 1:]
        flipped_value = value[:index] + bytes([value[index] ^ 0x80]) + value[index + 1:]
        assert kv_wire.checksum(flipped_key, value) != original
        assert kv_wire.checksum(key, flipped_value) != original


def test_checksum_detects_swapped_key_and_value():
    key, value = b"\x01\x02\x03\x04", b"\x05\x06\x07\x08"
    assert kv_wire.checksum(key, value) != kv_wire.checksum(value, key)
