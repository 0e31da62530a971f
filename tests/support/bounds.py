"""Tolerances derived from floating-point error analysis, not from what one machine printed.

Libraries pick kernels by what the CPU has (MKL, oneDNN and FBGEMM on AVX2, AVX-512 or AMX), so sums are
accumulated in different orders on different machines; a bound must hold for every order.

- One dot product of length K in float32, any order, with or without FMA: |error| <= gamma_K |x| . |w| with
  gamma_K = K u / (1 - K u), u = 2^-24 (Higham, Accuracy and Stability of Numerical Algorithms, 3.1).
- A whole decoder: each layer adds rounding errors of its reductions (longest K = the MLP's intermediate
  size) to the residual stream. Rounding errors behave like a random walk, so one reduction's relative error
  is about sqrt(K) u with high probability (Higham and Mary, SIAM J. Sci. Comput. 2019); adding the layers'
  errors linearly (no cancellation assumed) bounds the logits' error by num_layers sqrt(K) u relative to the
  largest logit. On the default model (30 layers, K 1,536) that is 1,176 u x max|logit|; measured against a
  float64 reference over 24 positions: at most 164 u x max|logit| for the project's fp32 and fp16 paths and 71
  for transformers' fp32 (AMD EPYC, AVX-512, 1 and 2 threads). A wrong scale, a dropped term or unrounded
  weights miss it by orders of magnitude (fp16-rounded vs unrounded weights: 0.02 logits, about 80x it).
"""

import math

import torch

U32 = 2.0**-24  # unit roundoff of float32


def dot_product_bound(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Elementwise bound on |fl32(x @ weight.T) - (x @ weight.T)| for x (..., K), weight (N, K): gamma_K |x||w|."""
    k = x.shape[-1]
    gamma = k * U32 / (1 - k * U32)
    return gamma * (x.double().abs() @ weight.double().abs().t())


def decoder_tolerance(config, reference: torch.Tensor) -> float:
    """Absolute bound on a float32 decoder's logits against an exact (float64) reference: num_layers sqrt(K) u
    times the largest reference logit, K the longest reduction of a layer."""
    k = max(config.hidden_size, config.intermediate_size)
    return config.num_layers * math.sqrt(k) * U32 * float(reference.abs().max())


def assert_logits_match(got: torch.Tensor, reference: torch.Tensor, tolerance: float) -> None:
    """got and reference (..., vocab) agree elementwise within tolerance, and on what a user sees: the ranking
    of the top 5 tokens, wherever the reference separates neighbouring ranks by more than 2 x tolerance (two
    logits each off by tolerance can swap only if closer than that)."""
    got, reference = got.double(), reference.double()
    worst = float((got - reference).abs().max())
    assert worst <= tolerance, f"largest logit error {worst:.3g} exceeds the bound {tolerance:.3g}"
    top = reference.topk(6, dim=-1)
    got_top = got.topk(5, dim=-1).indices
    separated = (top.values[..., :-1] - top.values[..., 1:]) > 2 * tolerance  # rank r vs r + 1
    for rank in range(5):
        decided = separated[..., rank] & separated[..., rank - 1] if rank else separated[..., 0]
        assert torch.equal(got_top[..., rank][decided], top.indices[..., rank][decided]), f"top-{rank + 1} differs"


def greedy_margins(hf_model, prompt_ids: list[int], continuation: list[int]) -> list[float]:
    """transformers' float32 top-2 logit margin before each token of continuation (teacher-forced)."""
    model = hf_model[0]
    with torch.no_grad():
        logits = model(torch.tensor([prompt_ids + continuation])).logits[0, len(prompt_ids) - 1:-1]
    top2 = logits.topk(2, dim=-1).values
    return (top2[:, 0] - top2[:, 1]).tolist()
