"""GPTQ and the clipping search against independent references: the lazy, Cholesky-based GPTQ pass equals the
textbook Optimal Brain Surgeon loop (explicit inverse Hessian, one column removed at a time) in float64; on
inputs with correlated, unequal channels (as a transformer's are) it loses far less output than rounding to
nearest; the clipping search and the least-squares refit never lose more than what they start from. The GPTQ
checkpoint of a whole (tiny) model: tests/common/model/test_awq_and_checkpoints.py."""

import pytest
import torch

from common.model.clip_search import gram, search_clip_ranges
from common.model.gptq import gptq_codes, quantize_linear, refit_ranges
from common.model.quant_int4 import INT4_MAX, Int4Weight, group_ranges, range_parameters


def _inputs(tokens: int, cols: int, seed: int) -> torch.Tensor:
    """Low-rank correlated activations with a few large channels."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, 16, generator=gen) @ torch.randn(16, cols, generator=gen) * 0.2
    x += torch.randn(tokens, cols, generator=gen) * 0.05
    x[:, :4] *= 10
    return x


def _obs_reference(weight, hessian, scales, mins, group_size, order):
    """GPTQ as the OBS update it is, in float64 without blocks or Cholesky: quantise the columns in `order`;
    after each, spread its error over the remaining columns with the inverse Hessian of those columns."""
    w = weight.double().clone()
    h = hessian.double().clone()
    h.diagonal().add_(0.01 * h.diagonal().mean())
    codes = torch.zeros_like(w)
    remaining = list(order)
    for j in order:
        inverse = torch.linalg.inv(h[remaining][:, remaining])  # over the columns not yet quantised
        g = j // group_size
        scale, low = scales[:, g].double(), mins[:, g].double()
        code = torch.round((w[:, j] - low) / scale).clamp(0, INT4_MAX)
        codes[:, j] = code
        error = (w[:, j] - (code * scale + low)) / inverse[0, 0]
        w[:, remaining] -= error[:, None] * inverse[0][None, :]
        remaining.remove(j)
    return codes


def _output_error(x, weight, quantised: Int4Weight) -> float:
    return (x @ (weight - quantised.dequantize_rows()).T).pow(2).mean().item()


@pytest.mark.parametrize("act_order", [True, False])
def test_gptq_equals_the_textbook_obs_loop(act_order):
    cols, group = 96, 32
    x = _inputs(400, cols, seed=1)
    weight = torch.randn(12, cols, generator=torch.Generator().manual_seed(2)) * 0.05
    hessian = gram(x)
    scales, mins = range_parameters(*group_ranges(weight, group))
    ours = gptq_codes(weight, hessian, scales, mins, group, act_order=act_order)
    order = torch.argsort(hessian.diagonal(), descending=True, stable=True).tolist() if act_order else list(range(cols))
    expected = _obs_reference(weight, hessian, scales, mins, group, order)
    # float32 against float64: a code may differ where a value sits on a rounding boundary, nowhere else.
    assert (ours != expected).float().mean() < 0.01
    a = Int4Weight.from_codes(ours, scales, mins, group)
    b = Int4Weight.from_codes(expected, scales, mins, group)
    assert _output_error(x, weight, a) == pytest.approx(_output_error(x, weight, b), rel=0.02)


def test_gptq_loses_far_less_output_than_round_to_nearest_with_a_short_last_group():
    cols, group = 160, 64  # groups of 64, 64 and a last one of 32
    x = _inputs(600, cols, seed=3)
    weight = torch.randn(48, cols, generator=torch.Generator().manual_seed(4)) * 0.05
    hessian = gram(x)
    rtn = _output_error(x, weight, Int4Weight.pack(weight, group))
    gptq = quantize_linear(weight, hessian, group)
    assert gptq.scales.shape == (48, 3)
    assert _output_error(x, weight, gptq) < 0.3 * rtn


def test_clip_search_and_refit_never_lose_more_than_their_start():
    cols, group = 128, 32
    x = _inputs(300, cols, seed=5)
    weight = torch.randn(40, cols, generator=torch.Generator().manual_seed(6)) * 0.05
    weight[:, 7] *= 6  # an outlier weight: clipping it pays off where its input is small
    hessian = gram(x)

    def group_losses(quantised: Int4Weight) -> torch.Tensor:
        error = (weight - quantised.dequantize_rows()).double()
        return torch.stack([(error[:, g:g + group] @ hessian[g:g + group, g:g + group] * error[:, g:g + group]).sum(1)
                            for g in range(0, cols, group)], dim=1)

    plain = Int4Weight.pack(weight, group)
    clipped = Int4Weight.from_ranges(weight, *search_clip_ranges(weight, hessian, group), group)
    assert (group_losses(clipped) <= group_losses(plain) * (1 + 1e-6)).all()
    assert group_losses(clipped).sum() < group_losses(plain).sum()
    codes = torch.cat([clipped.packed & 15, clipped.packed >> 4], dim=1)
    scales, mins = refit_ranges(weight, hessian, codes, group)
    refit = Int4Weight(in_features=cols, compute_dtype=torch.float32, group_size=group, packed=clipped.packed,
                       scales=scales.double().float(), mins=mins)  # unrounded: the least squares optimum itself
    assert (group_losses(refit) <= group_losses(clipped) * (1 + 1e-6)).all()

