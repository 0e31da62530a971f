"""Mixtral-style sparse mixture-of-experts MLP.

Routing as Hugging Face's MixtralTopKRouter: router logits (tokens, experts) -> softmax over all experts in
fp32 -> the top-k experts per token -> their k probabilities renormalised to sum to 1. Each expert is a SwiGLU
MLP (common/model/mlp.py's DenseMlp) whose linears come from make_linear, so quantisation applies per expert;
the router stays dense (it is tiny, and a flipped choice costs a whole expert).

LlamaModel calls each layer's MLP as `mlp(h, expert_load)`; for a Mixtral checkpoint that is this class.
expert_load, when given, is the layer's (experts,) int64 counter and gains the tokens routed to each expert:
the ModelRunner owns the counters, because one model may serve two engines at once (colocated prefill and
decode), each counting its own work.

Checkpoints name experts two ways; split_experts turns both into one (out, in) weight per expert projection,
named as a Llama MLP's under `mlp.experts.<e>.`, so packing, quantised checkpoints and the model need no other
case:
    model.layers.<i>.block_sparse_moe.experts.<e>.w1|w3|w2.weight   (what save_pretrained writes)
    model.layers.<i>.mlp.experts.gate_up_proj (experts, 2 * intermediate, hidden), .down_proj
                                                                    (transformers 5's in-memory state_dict)
    -> model.layers.<i>.mlp.experts.<e>.gate_proj|up_proj|down_proj.weight, router mlp.gate.weight
"""

import re

import torch
import torch.nn.functional as F

from common.model.linear import make_linear
from common.model.mlp import DenseMlp

_LEGACY = re.compile(r"(model\.layers\.\d+\.)block_sparse_moe\.(?:gate\.weight|experts\.(\d+)\.(w1|w2|w3)\.weight)")
_FUSED = re.compile(r"(model\.layers\.\d+\.)mlp\.experts\.(gate_up_proj|down_proj)")
_LEGACY_PROJ = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}


def split_experts(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Hugging Face Mixtral names (either layout) -> one weight per expert projection; other names unchanged."""
    out: dict[str, torch.Tensor] = {}
    for name, tensor in weights.items():
        if legacy := _LEGACY.fullmatch(name):
            layer, expert, proj = legacy.groups()
            key = "mlp.gate.weight" if expert is None else f"mlp.experts.{expert}.{_LEGACY_PROJ[proj]}.weight"
            out[layer + key] = tensor
        elif fused := _FUSED.fullmatch(name):
            layer, kind = fused.groups()
            for expert, weight in enumerate(tensor):
                if kind == "down_proj":
                    out[f"{layer}mlp.experts.{expert}.down_proj.weight"] = weight  # (hidden, intermediate)
                else:
                    gate, up = weight.chunk(2)  # (intermediate, hidden) each
                    out[f"{layer}mlp.experts.{expert}.gate_proj.weight"] = gate
                    out[f"{layer}mlp.experts.{expert}.up_proj.weight"] = up
        else:
            out[name] = tensor
    return out


class MoeMlp:
    def __init__(self, router: torch.Tensor, experts: list[DenseMlp], top_k: int) -> None:
        if not 1 <= top_k <= len(experts):
            raise ValueError(f"top_k must be in [1, {len(experts)}], got {top_k}")
        self.router = router  # (experts, hidden)
        self.experts = experts
        self.top_k = top_k

    @classmethod
    def from_weights(cls, router: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, top_k: int,
                     weight_format: str = "fp32") -> "MoeMlp":
        """gate_up (experts, 2 * intermediate, hidden), down (experts, hidden, intermediate): Hugging Face's
        MixtralExperts layout."""
        experts = [DenseMlp(make_linear(gate_up[e], weight_format), make_linear(down[e], weight_format))
                   for e in range(gate_up.shape[0])]
        return cls(router, experts, top_k)

    @classmethod
    def from_layer(cls, w: dict, prefix: str, num_experts: int, top_k: int, weight_format: str) -> "MoeMlp":
        """A layer's weights named as split_experts names them, under prefix (`model.layers.<i>.mlp.`)."""
        experts = [DenseMlp.from_weights(w, f"{prefix}experts.{e}.", weight_format) for e in range(num_experts)]
        return cls(w[prefix + "gate.weight"].clone(), experts, top_k)  # owned: not a view of the checkpoint's map

    def linears(self) -> tuple:
        return tuple(linear for expert in self.experts for linear in expert.linears())

    def route(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """h (tokens, hidden) -> (weights (tokens, top_k) in fp32 summing to 1, expert ids (tokens, top_k))."""
        probs = torch.softmax(F.linear(h, self.router).float(), dim=-1)  # (tokens, experts)
        weights, chosen = probs.topk(self.top_k, dim=-1)
        return weights / weights.sum(dim=-1, keepdim=True), chosen

    def __call__(self, h: torch.Tensor, expert_load: torch.Tensor | None = None) -> torch.Tensor:
        weights, chosen = self.route(h)
        if expert_load is not None:
            expert_load.add_(torch.bincount(chosen.flatten(), minlength=len(self.experts)))
        out = torch.zeros_like(h)
        for expert_id in chosen.unique().tolist():
            tokens, slot = (chosen == expert_id).nonzero(as_tuple=True)
            y = self.experts[expert_id](h[tokens]) * weights[tokens, slot, None].to(h.dtype)  # (routed, hidden)
            out.index_add_(0, tokens, y)
        return out

    @property
    def nbytes(self) -> int:
        return self.router.numel() * self.router.element_size() + sum(e.nbytes for e in self.experts)
