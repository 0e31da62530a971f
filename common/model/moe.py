"""Mixtral-style sparse mixture-of-experts MLP.

Routing as Hugging Face's MixtralTopKRouter: router logits (tokens, experts) -> softmax over all experts in
fp32 -> the top-k experts per token -> their k probabilities renormalised to sum to 1. Each expert is a SwiGLU
MLP (down(silu(gate(x)) * up(x))) whose linears come from make_linear, so quantisation applies per expert;
the router stays dense (it is tiny, and a flipped choice costs a whole expert). `expert_load` counts the tokens
routed to each expert, for stats.

Not yet wired into LlamaModel: its layers call a dense gate/up + down pair directly (common/model/llama.py);
an MoE checkpoint needs that MLP call to become a per-layer callable that this class can fill.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from common.model.linear import make_linear


@dataclass(frozen=True)
class Expert:
    gate_up: object  # linear: hidden -> 2 * intermediate
    down: object  # linear: intermediate -> hidden


class MoeMlp:
    def __init__(self, router: torch.Tensor, experts: list[Expert], top_k: int) -> None:
        if not 1 <= top_k <= len(experts):
            raise ValueError(f"top_k must be in [1, {len(experts)}], got {top_k}")
        self.router = router  # (experts, hidden)
        self.experts = experts
        self.top_k = top_k
        self.expert_load = torch.zeros(len(experts), dtype=torch.long)

    @classmethod
    def from_weights(cls, router: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, top_k: int,
                     weight_format: str = "fp32") -> "MoeMlp":
        """gate_up (experts, 2 * intermediate, hidden), down (experts, hidden, intermediate): Hugging Face's
        MixtralExperts layout."""
        experts = [Expert(make_linear(gate_up[e], weight_format), make_linear(down[e], weight_format))
                   for e in range(gate_up.shape[0])]
        return cls(router, experts, top_k)

    def route(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """h (tokens, hidden) -> (weights (tokens, top_k) in fp32 summing to 1, expert ids (tokens, top_k))."""
        probs = torch.softmax(F.linear(h, self.router).float(), dim=-1)  # (tokens, experts)
        weights, chosen = probs.topk(self.top_k, dim=-1)
        return weights / weights.sum(dim=-1, keepdim=True), chosen

    def __call__(self, h: torch.Tensor) -> torch.Tensor:
        weights, chosen = self.route(h)
        self.expert_load += torch.bincount(chosen.flatten(), minlength=len(self.experts)).cpu()
        out = torch.zeros_like(h)
        for expert_id in chosen.unique().tolist():
            tokens, slot = (chosen == expert_id).nonzero(as_tuple=True)
            expert = self.experts[expert_id]
            gate, up = expert.gate_up(h[tokens]).chunk(2, dim=-1)
            y = expert.down(F.silu(gate) * up) * weights[tokens, slot, None].to(h.dtype)  # (routed, hidden)
            out.index_add_(0, tokens, y)
        return out
