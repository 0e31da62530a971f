"""KV tensors <-> raw little-endian bytes for transfer between tiers (never pickle), with a CRC-32."""

import sys
import zlib

import torch

from common.errors import InvalidArgument

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}

if sys.byteorder != "little":
    raise ImportError("pdserve's KV wire format is little-endian; this host is big-endian")


def to_bytes(tensor: torch.Tensor) -> bytes:
    return tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()


def checksum(key: bytes, value: bytes) -> int:
    return zlib.crc32(value, zlib.crc32(key))


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
