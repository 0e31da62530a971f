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
        rows, cols = weight.shape
        if cols % 2:
            raise ValueError(f"int4 packing needs an even number of input features, got {cols}")
        groups = replicate_pad_columns(weight.float(), group_size).view(rows, -1, group_size)
        low, high = groups.amin(dim=2), groups.amax(dim=2)  # (rows, groups)
        scales = ((high - low) / INT4_MAX).to(torch.float16)
        scales = torch.where(scales > 0, scales, torch.ones_like(scales))  # constant group: all codes 0
        mins = low.to(torch.float16)
        codes = torch.round((groups - mins[..., None].float()) / scales[..., None].float()).clamp(0, INT4_MAX)
        codes = codes.view(rows, -1)[:, :cols].to(torch.uint8)
        packed = codes[:, : cols // 2] | (codes[:, cols // 2:] << 4)
        return cls(in_features=cols, compute_dtype=weight.dtype, group_size=group_size, packed=packed,
                   scales=scales, mins=mins)

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
