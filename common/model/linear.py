"""Linear layers of the model, one class per weight format, chosen in one registry.

The model only calls `layer(x)`; a format decides how its weight is stored and multiplied. Dense
(fp32/fp16/bf16) is here; quantised formats register themselves in WEIGHT_FORMATS.
"""

from collections.abc import Callable

import torch
import torch.nn.functional as F


class DenseLinear:
    def __init__(self, weight: torch.Tensor) -> None:
        self.weight = weight  # (out_features, in_features)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)

    @property
    def nbytes(self) -> int:
        return self.weight.numel() * self.weight.element_size()


# format name -> builder from a dense (out, in) weight, already on its device and in the compute dtype
WEIGHT_FORMATS: dict[str, Callable[[torch.Tensor], DenseLinear]] = {
    "dense": DenseLinear,
}


def make_linear(weight: torch.Tensor, weight_format: str = "dense"):
    builder = WEIGHT_FORMATS.get(weight_format)
    if builder is None:
        raise ValueError(f"weight format {weight_format!r} is unknown; expected one of {sorted(WEIGHT_FORMATS)}")
    return builder(weight)
