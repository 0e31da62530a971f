"""fp8-e4m3 weights with one float32 scale per output channel: W[n] = fp8[n] * scale[n].

The scale maps each row's largest magnitude to e4m3's largest finite value (448). Dequantised in row
chunks on CPU; on a GPU it dequantises before the product (an fp8 tensor-core path is future work).
"""

import dataclasses

import torch

from common.model.packed import PackedWeight

E4M3_MAX = torch.finfo(torch.float8_e4m3fn).max  # 448


@dataclasses.dataclass(eq=False)
class Fp8Weight(PackedWeight):
    kind = "fp8-e4m3"
    data: torch.Tensor  # (out, in) float8_e4m3fn
    scales: torch.Tensor  # (out,) float32

    @classmethod
    def pack(cls, weight: torch.Tensor) -> "Fp8Weight":
        w = weight.float()
        scales = (w.abs().amax(dim=1) / E4M3_MAX).clamp(min=torch.finfo(torch.float32).tiny)
        data = (w / scales[:, None]).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
        return cls(in_features=weight.shape[1], compute_dtype=weight.dtype, data=data, scales=scales)

    def dequantize_rows(self, rows=slice(None)) -> torch.Tensor:
        return self.data[rows].to(self.compute_dtype).mul_(self.scales[rows, None].to(self.compute_dtype))
