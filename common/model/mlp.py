"""The dense MLP of a decoder layer: SwiGLU, down(silu(gate(x)) * up(x)), gate and up joined in one linear.

Every layer's MLP is a callable `mlp(h, expert_load)` -> (tokens, hidden): this class for Llama, and
common/model/moe.py's MoeMlp (whose experts are this class) for Mixtral. A dense MLP ignores expert_load.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from common.model.linear import make_linear


@dataclass(frozen=True)
class DenseMlp:
    gate_up: object  # linear: hidden -> 2 * intermediate
    down: object  # linear: intermediate -> hidden

    @classmethod
    def from_weights(cls, w: dict, prefix: str, weight_format: str) -> "DenseMlp":
        """prefix.gate_proj.weight, prefix.up_proj.weight (intermediate, hidden), prefix.down_proj.weight."""
        gate_up = torch.cat([w[prefix + "gate_proj.weight"], w[prefix + "up_proj.weight"]])
        return cls(make_linear(gate_up, weight_format), make_linear(w[prefix + "down_proj.weight"], weight_format))

    def __call__(self, h: torch.Tensor, expert_load: torch.Tensor | None = None) -> torch.Tensor:
        gate, up = self.gate_up(h).chunk(2, dim=-1)  # (tokens, intermediate) each
        return self.down(F.silu(gate) * up)

    def linears(self) -> tuple:
        return self.gate_up, self.down

    @property
    def nbytes(self) -> int:
        return self.gate_up.nbytes + self.down.nbytes
