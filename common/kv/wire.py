"""KV tensors <-> raw little-endian bytes for transfer between tiers (never pickle), with a CRC-32.

Float dtypes carry key and value only. Quantised dtypes (int8, fp8 = float8 e4m3fn) carry the codes as
stored plus key_scale and value_scale: float32, shape (tokens, kv_heads). The CRC covers all four.
"""

import sys
import zlib
from dataclasses import dataclass

import torch

from common.basics.errors import InvalidArgument
from common.kv.quant import SCALE_DTYPE, KvRows, is_quantised

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
          "int8": torch.int8, "fp8": torch.float8_e4m3fn}
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}

if sys.byteorder != "little":
    raise ImportError("pdserve's KV wire format is little-endian; this host is big-endian")


@dataclass(frozen=True)
class KvPayload:
    """One chunk's bytes as they travel; the scales are empty for float dtypes."""

    key: bytes
    value: bytes
    key_scale: bytes = b""
    value_scale: bytes = b""

    @property
    def num_bytes(self) -> int:
        return len(self.key) + len(self.value) + len(self.key_scale) + len(self.value_scale)

    @property
    def crc32(self) -> int:
        return checksum(self.key, self.value, self.key_scale, self.value_scale)


def to_bytes(tensor: torch.Tensor) -> bytes:
    return tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()


def checksum(key: bytes, value: bytes, key_scale: bytes = b"", value_scale: bytes = b"") -> int:
    """CRC-32 of key, value, key_scale, value_scale in that order (empty scales leave it unchanged)."""
    return zlib.crc32(value_scale, zlib.crc32(key_scale, zlib.crc32(value, zlib.crc32(key))))


def from_bytes(data: bytes, dtype_name: str, shape: tuple[int, ...]) -> torch.Tensor:
    dtype = DTYPES.get(dtype_name)
    if dtype is None:
        raise InvalidArgument(f"KV dtype {dtype_name!r} is unknown; expected one of {sorted(DTYPES)}")
    expected = dtype.itemsize
    for size in shape:
        expected *= size
    if len(data) != expected:
        raise InvalidArgument(f"KV payload has {len(data)} bytes; shape {shape} of {dtype_name} needs {expected}")
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).view(dtype).reshape(shape)


def rows_to_payload(rows: KvRows) -> KvPayload:
    """The stored rows' bytes, unchanged: (tokens, kv_heads, head_dim) codes, (tokens, kv_heads) scales."""
    if rows.key_scale is None:
        return KvPayload(to_bytes(rows.key), to_bytes(rows.value))
    return KvPayload(to_bytes(rows.key), to_bytes(rows.value), to_bytes(rows.key_scale), to_bytes(rows.value_scale))


def rows_from_payload(payload: KvPayload, dtype_name: str, shape: tuple[int, ...]) -> KvRows:
    """Checks every length against dtype and shape (tokens, kv_heads, head_dim); raises InvalidArgument."""
    key, value = from_bytes(payload.key, dtype_name, shape), from_bytes(payload.value, dtype_name, shape)
    if not is_quantised(key.dtype):
        if payload.key_scale or payload.value_scale:
            raise InvalidArgument(f"KV dtype {dtype_name} carries no scales; got {len(payload.key_scale)} bytes of "
                                  f"key_scale and {len(payload.value_scale)} of value_scale")
        return KvRows(key, value)
    return KvRows(key, value, _scales(payload.key_scale, "key_scale", dtype_name, shape),
                  _scales(payload.value_scale, "value_scale", dtype_name, shape))


def _scales(data: bytes, field: str, dtype_name: str, shape: tuple[int, ...]) -> torch.Tensor:
    tokens_heads = tuple(shape[:2])
    expected = SCALE_DTYPE.itemsize * tokens_heads[0] * tokens_heads[1]
    if len(data) != expected:
        raise InvalidArgument(f"KV {field} has {len(data)} bytes; {dtype_name} KV of shape {tuple(shape)} needs "
                              f"{expected} (float32 per token and KV head, shape {tokens_heads})")
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).view(SCALE_DTYPE).reshape(tokens_heads)
