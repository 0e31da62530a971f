"""int4 weight-only, asymmetric, group-wise along the input dimension:
W[n, k] = q[n, k] * scale[n, g] + min[n, g], q in [0, 15], g = k // group_size (scale and min in fp16).

Two codes per byte in the "half-split" layout the kernels use: byte j of a row holds k = j in its low nibble
and k = j + in/2 in its high nibble, so unpacking is two contiguous halves. When group_size does not divide
in_features (576 = 4 * 128 + 64 on the default model) the last group is shorter.

CPU path, chosen by measurement (docs/fidelity.md): unpack and dequantise 1,024 rows at a time, multiply in
fp32. torch.ops.aten._weight_int4pack_mm_for_cpu was about as fast at one token and 5-20x slower at 32
tokens, and needs group_size to divide in_features. On CUDA the fused Triton kernel serves.
"""

import dataclasses

import torch

from common.model.packed import PackedWeight, replicate_pad_columns

INT4_MAX = 15


@dataclasses.dataclass(eq=False)
class Int4Weight(PackedWeight):
    kind = "int4"
    group_size: int
    packed: torch.Tensor  # (out, in / 2) uint8
    scales: torch.Tensor  # (out, groups) float16
    mins: torch.Tensor  # (out, groups) float16

    @classmethod
    def pack(cls, weight: torch.Tensor, group_size: int) -> "Int4Weight":
        """Round to nearest, each group's range its own minimum and maximum."""
        low, high = group_ranges(weight, group_size)
        return cls.from_ranges(weight, low, high, group_size)

    @classmethod
    def from_ranges(cls, weight: torch.Tensor, low: torch.Tensor, high: torch.Tensor,
                    group_size: int) -> "Int4Weight":
        """Round to nearest within given group ranges (rows, groups): elements outside a range clip to it."""
        scales, mins = range_parameters(low, high)
        return cls.from_codes(quantize_codes(weight.float(), scales, mins, group_size), scales, mins, group_size,
                              weight.dtype)

    @classmethod
    def from_codes(cls, codes: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor, group_size: int,
                   compute_dtype: torch.dtype = torch.float32) -> "Int4Weight":
        """Codes (rows, in) in [0, 15] chosen elsewhere (GPTQ), with their groups' fp16 scales and minimums."""
        rows, cols = codes.shape
        if cols % 2:
            raise ValueError(f"int4 packing needs an even number of input features, got {cols}")
        codes = codes.to(torch.uint8)
        packed = codes[:, : cols // 2] | (codes[:, cols // 2:] << 4)
        return cls(in_features=cols, compute_dtype=compute_dtype, group_size=group_size, packed=packed,
                   scales=scales.to(torch.float16), mins=mins.to(torch.float16))

    def dequantize_rows(self, rows=slice(None)) -> torch.Tensor:
        packed = self.packed[rows]
        out = torch.cat([packed & 15, packed >> 4], dim=1).to(self.compute_dtype)  # (n, in) codes
        scales, mins = self.scales[rows].to(self.compute_dtype), self.mins[rows].to(self.compute_dtype)
        full = self.in_features // self.group_size
        body = out[:, : full * self.group_size].view(out.shape[0], full, self.group_size)
        body.mul_(scales[:, :full, None]).add_(mins[:, :full, None])
        if full * self.group_size < self.in_features:
            tail = out[:, full * self.group_size:]
            tail.mul_(scales[:, full:]).add_(mins[:, full:])
        return out

    def matmul_cuda(self, x: torch.Tensor) -> torch.Tensor:
        from common.kernels.quant_matmul import int4_matmul

        return int4_matmul(x, self.packed, self.scales, self.mins, self.group_size)


def group_ranges(weight: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each group's minimum and maximum, (rows, groups) each in fp32; a short last group counts its own
    elements only."""
    rows = weight.shape[0]
    groups = replicate_pad_columns(weight.float(), group_size).view(rows, -1, group_size)
    return groups.amin(dim=2), groups.amax(dim=2)


def range_parameters(low: torch.Tensor, high: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fp16 (scales, mins) that map codes 0..15 onto [low, high]; a constant group gets scale 1 (codes 0)."""
    scales = ((high - low) / INT4_MAX).to(torch.float16)
    scales = torch.where(scales > 0, scales, torch.ones_like(scales))
    return scales, low.to(torch.float16)


def quantize_codes(weight: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor, group_size: int) -> torch.Tensor:
    """Round-to-nearest codes (rows, in) of fp32 weights under per-group fp16 scales and minimums."""
    column_groups = torch.arange(weight.shape[1], device=weight.device) // group_size
    scale, low = scales.float()[:, column_groups], mins.float()[:, column_groups]
    return torch.round((weight - low) / scale).clamp_(0, INT4_MAX)


def fake_quantize_groups(groups: torch.Tensor, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """Groups (..., g) quantised within ranges (...) and dequantised, with the format's fp16 scale and minimum:
    what packing and dequantize_rows give, for searches that try many ranges."""
    scales, mins = range_parameters(low, high)
    scale, mins = scales.float()[..., None], mins.float()[..., None]
    return torch.round((groups - mins) / scale).clamp_(0, INT4_MAX).mul_(scale).add_(mins)
