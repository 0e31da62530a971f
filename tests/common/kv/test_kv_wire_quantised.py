"""The wire format of quantised KV (int8, fp8): codes and scales travel bit-exact, the CRC covers the
scales, scale payloads of the wrong size are refused, and the bytes shrink as the format promises."""

import pytest
import torch

from common.basics.errors import InvalidArgument
from common.kv import wire as kv_wire
from common.kv.pool import KvPool

TOKENS, HEADS, HEAD_DIM = 5, 3, 64
SHAPE = (TOKENS, HEADS, HEAD_DIM)


def stored_rows(dtype_name: str):
    """Rows exactly as a pool of `dtype_name` stores them (quantised once, there)."""
    pool = KvPool(num_layers=1, num_blocks=2, block_size=4, num_kv_heads=HEADS, head_dim=HEAD_DIM,
                  dtype=kv_wire.DTYPES[dtype_name])
    gen = torch.Generator().manual_seed(0)
    return pool.encode(torch.randn(SHAPE, generator=gen) * 3, torch.randn(SHAPE, generator=gen))


@pytest.mark.parametrize("dtype_name", ["int8", "fp8"])
def test_codes_and_scales_round_trip_bit_exact(dtype_name):
    rows = stored_rows(dtype_name)
    payload = kv_wire.rows_to_payload(rows)
    assert len(payload.key) == TOKENS * HEADS * HEAD_DIM and len(payload.key_scale) == TOKENS * HEADS * 4
    received = kv_wire.rows_from_payload(kv_wire.KvPayload(payload.key, payload.value, payload.key_scale,
                                                           payload.value_scale), dtype_name, SHAPE)
    assert received.key.dtype == rows.key.dtype
    for name in ("key", "value"):
        assert torch.equal(getattr(received, name).view(torch.uint8), getattr(rows, name).view(torch.uint8))
        assert torch.equal(getattr(received, name + "_scale").view(torch.int32),
                           getattr(rows, name + "_scale").view(torch.int32))


def test_scales_are_little_endian_float32_of_shape_tokens_by_heads():
    rows = stored_rows("int8")
    payload = kv_wire.rows_to_payload(rows)
    assert payload.value_scale[:4] == rows.value_scale[0, 0].numpy().astype("<f4").tobytes()
    assert payload.value_scale[4:8] == rows.value_scale[0, 1].numpy().astype("<f4").tobytes()


@pytest.mark.parametrize("field", ["key_scale", "value_scale"])
def test_checksum_covers_the_scales(field):
    payload = kv_wire.rows_to_payload(stored_rows("fp8"))
    data = getattr(payload, field)
    flipped = data[:7] + bytes([data[7] ^ 0x04]) + data[8:]
    corrupted = kv_wire.KvPayload(**{**payload.__dict__, field: flipped})
    assert corrupted.crc32 != payload.crc32
    swapped = kv_wire.KvPayload(payload.key, payload.value, payload.value_scale, payload.key_scale)
    assert swapped.crc32 != payload.crc32


def test_float_checksum_is_unchanged_by_empty_scales():
    payload = kv_wire.rows_to_payload(stored_rows("float32"))
    assert payload.crc32 == kv_wire.checksum(payload.key, payload.value)


@pytest.mark.parametrize("field, delta", [("key_scale", -4), ("value_scale", 4), ("key_scale", -len(b"x"))])
def test_wrong_scale_length_is_an_invalid_argument(field, delta):
    payload = kv_wire.rows_to_payload(stored_rows("int8"))
    data = getattr(payload, field)
    wrong = data[:delta] if delta < 0 else data + b"\x00" * delta
    with pytest.raises(InvalidArgument, match=rf"KV {field} has {len(wrong)} bytes; int8 KV of shape "
                                              rf"\(5, 3, 64\) needs 60 \(float32 per token and KV head"):
        kv_wire.rows_from_payload(kv_wire.KvPayload(**{**payload.__dict__, field: wrong}), "int8", SHAPE)


def test_missing_scales_are_an_invalid_argument():
    payload = kv_wire.rows_to_payload(stored_rows("fp8"))
    with pytest.raises(InvalidArgument, match=r"KV key_scale has 0 bytes"):
        kv_wire.rows_from_payload(kv_wire.KvPayload(payload.key, payload.value), "fp8", SHAPE)


def test_scales_on_a_float_dtype_are_an_invalid_argument():
    payload = kv_wire.rows_to_payload(stored_rows("float16"))
    with pytest.raises(InvalidArgument, match=r"float16 carries no scales; got 60 bytes of key_scale"):
        kv_wire.rows_from_payload(kv_wire.KvPayload(payload.key, payload.value, b"\x00" * 60), "float16", SHAPE)


@pytest.mark.parametrize("dtype_name", ["int8", "fp8"])
def test_quantised_transfer_is_head_dim_plus_4_over_4_head_dim_of_float32(dtype_name):
    quantised = kv_wire.rows_to_payload(stored_rows(dtype_name)).num_bytes
    full = kv_wire.rows_to_payload(stored_rows("float32")).num_bytes
    assert quantised / full == (HEAD_DIM + 4) / (4 * HEAD_DIM)  # 0.265 at head_dim 64
