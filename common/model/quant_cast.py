"""fp16 / bf16 weights: stored at half the bytes of fp32, widened to the compute dtype row chunk by row chunk
(on CPU, fp32 products are the fast ones; on a GPU the compute dtype may itself be fp16/bf16)."""

import dataclasses

import torch

from common.model.packed import PackedWeight


@dataclasses.dataclass(eq=False)
class CastWeight(PackedWeight):
    kind = "cast"
    data: torch.Tensor  # (out, in) in the storage dtype

    @classmethod
    def pack(cls, weight: torch.Tensor, storage: torch.dtype) -> "CastWeight":
        return cls(in_features=weight.shape[1], compute_dtype=weight.dtype, data=weight.to(storage))

    def dequantize_rows(self, rows=slice(None)) -> torch.Tensor:
        return self.data[rows].to(self.compute_dtype)

    def matmul_cuda(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(x, self.data.to(x.dtype))
