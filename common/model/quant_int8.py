"""int8 weight-only, symmetric, one float32 scale per output channel: W[n, k] = q[n, k] * scale[n].

CPU path, chosen by measurement (docs/fidelity.md): dequantise 1,024 rows at a time and multiply in fp32.
torch.ops.aten._weight_int8pack_mm computes the same product but measured 3-30x slower than that on these
CPUs (no VNNI). On CUDA the fused Triton kernel (common/kernels/quant_matmul.py) serves.
"""

import dataclasses

import torch

from common.model.packed import PackedWeight

INT8_MAX = 127


@dataclasses.dataclass(eq=False)
class Int8Weight(PackedWeight):
    kind = "int8"
    qweight: torch.Tensor  # (out, in) int8
    scales: torch.Tensor  # (out,) float32

    @classmethod
    def pack(cls, weight: torch.Tensor) -> "Int8Weight":
        w = weight.float()
        scales = (w.abs().amax(dim=1) / INT8_MAX).clamp(min=torch.finfo(torch.float32).tiny)
        qweight = torch.round(w / scales[:, None]).clamp(-INT8_MAX, INT8_MAX).to(torch.int8)
        return cls(in_features=weight.shape[1], compute_dtype=weight.dtype, qweight=qweight, scales=scales)

    def dequantize_rows(self, rows=slice(None)) -> torch.Tensor:
        return self.qweight[rows].to(self.compute_dtype).mul_(self.scales[rows, None].to(self.compute_dtype))

    def matmul_cuda(self, x: torch.Tensor) -> torch.Tensor:
        from common.kernels.quant_matmul import int8_matmul

        return int8_matmul(x, self.qweight, self.scales)
