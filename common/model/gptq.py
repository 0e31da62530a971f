"""GPTQ (Frantar et al. 2022) for the int4 formats: second-order rounding, in act-order, groups of 128.

Round-to-nearest quantises every weight on its own. GPTQ quantises a row's weights one input column at a
time and spreads each rounding error over the columns not yet quantised, weighted by the inverse of the
input Gram matrix H = x^T x of calibration activations, so the layer's output on those activations moves
as little as possible (the Optimal Brain Surgeon update, computed for all rows at once):

    for column j (in the order below):  q_j = Q(w_j);  w_{>j} -= (w_j - q_j) / U_jj * U_{j,>j}

with U the upper Cholesky factor of H^-1 (H damped by 1% of its mean diagonal). As in the paper's reference
implementation the updates are applied lazily in blocks of 128 columns.

- Act-order: columns are taken in order of decreasing H_jj (inputs with most energy first), where the error
  still has the most columns left to be absorbed by.
- Groups stay contiguous in the stored format (Int4Weight: groups of 128 along the input): with act-order a
  column's group is its place in the original order, and every group's range is fixed before the pass
  ("static groups"), chosen by the clipping search on H (common/model/clip_search.py).
- Sequential: one calibration prefill runs through the model while each linear, when it first sees its input,
  is quantised and then computes with its quantised weights, so every later layer calibrates on the inputs
  the quantised model really produces (the paper's true-sequential mode). q/k/v share an input and are
  quantised as one matrix (rows are independent in GPTQ), as are gate/up.
- Refit: with the codes fixed, each group's scale and minimum are refitted by least squares to the output
  error (refit_ranges), and GPTQ runs again under them: measured better than either pass alone.

Calibration: the hand-written texts and texts the model wrote itself (common/model/calibration.py).
Measured on the default model (docs/fidelity.md): AWQ's scales folded first and GPTQ after them did worse
than GPTQ alone, so that combination is not offered.
"""

import dataclasses

import torch

from common.basics.model_config import ModelConfig
from common.model.calibration import calibration_model, check_supported, fused_projections, run_prefill
from common.model.clip_search import gram, search_clip_ranges
from common.model.linear import DenseLinear, WeightFormat
from common.model.mlp import DenseMlp
from common.model.packed import PackedWeight
from common.model.quant_int4 import INT4_MAX, Int4Weight, range_parameters

DAMP = 0.01  # fraction of H's mean diagonal added to its diagonal
BLOCK = 128  # columns per lazy update


def gptq_codes(weight: torch.Tensor, hessian: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor,
               group_size: int, act_order: bool = True) -> torch.Tensor:
    """Int4 codes (rows, in) for weight (rows, in) under fixed per-group fp16 scales and minimums (rows,
    groups), minimising the output error on inputs whose Gram matrix is hessian (in, in)."""
    w = weight.float().clone()
    h = hessian.double().clone()
    cols = w.shape[1]
    dead = h.diagonal() == 0  # inputs calibration never saw: no information, rounded to nearest
    h[dead, dead] = 1.0
    order = torch.argsort(h.diagonal(), descending=True, stable=True) if act_order else torch.arange(cols)
    w, h = w[:, order], h[order][:, order]
    h.diagonal().add_(DAMP * h.diagonal().mean())
    upper = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True).float()
    groups = order // group_size  # each permuted column's group in the stored (original) order
    scale, low = scales.float()[:, groups], mins.float()[:, groups]  # (rows, in), permuted
    codes = torch.empty_like(w)
    for start in range(0, cols, BLOCK):
        end = min(start + BLOCK, cols)
        block, errors, u = w[:, start:end].clone(), torch.empty(w.shape[0], end - start), upper[start:end, start:end]
        for i in range(end - start):
            j = start + i
            column = block[:, i]
            code = torch.round((column - low[:, j]) / scale[:, j]).clamp_(0, INT4_MAX)
            codes[:, j] = code
            error = (column - (code * scale[:, j] + low[:, j])) / u[i, i]
            block[:, i:] -= error[:, None] * u[i, i:][None, :]
            errors[:, i] = error
        w[:, end:] -= errors @ upper[start:end, end:]
    restored = torch.empty_like(codes)
    restored[:, order] = codes
    return restored


def quantize_linear(weight: torch.Tensor, hessian: torch.Tensor, group_size: int) -> Int4Weight:
    """One linear: clipped static group ranges, GPTQ codes within them, each group's scale and minimum refitted
    to those codes by least squares, then GPTQ again under the refitted parameters."""
    scales, mins = range_parameters(*search_clip_ranges(weight, hessian, group_size))
    refit_scales, refit_mins = refit_ranges(weight, hessian, gptq_codes(weight, hessian, scales, mins, group_size),
                                            group_size)
    unfit = torch.isnan(refit_scales)  # a degenerate group: keep the clipped range
    scales = torch.where(unfit, scales.float(), refit_scales).to(torch.float16)
    mins = torch.where(unfit, mins.float(), refit_mins).to(torch.float16)
    return Int4Weight.from_codes(gptq_codes(weight, hessian, scales, mins, group_size), scales, mins, group_size)


class _Quantiser:
    """Stands in for a dense linear during the calibration prefill: quantises its weight on the first input
    it sees, then computes with the quantised weight."""

    def __init__(self, inner: DenseLinear, found: dict, key: tuple[int, str], group_size: int) -> None:
        self.inner, self.found, self.key, self.group_size = inner, found, key, group_size

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        quantised = quantize_linear(self.inner.weight.float(), gram(x), self.group_size)
        self.found[self.key] = quantised
        return x @ quantised.dequantize_rows().T


def apply_gptq(config: ModelConfig, weights: dict[str, torch.Tensor], calibration: list[list[int]],
               fmt: WeightFormat) -> dict[str, torch.Tensor | PackedWeight]:
    """The format's weights: projections as GPTQ int4, the embedding in the format's embedding packing, norms
    as they are."""
    check_supported(config, fmt)
    model = calibration_model(config, weights)
    found: dict[tuple[int, str], Int4Weight] = {}
    for i, layer in enumerate(model.layers):
        model.layers[i] = dataclasses.replace(
            layer, qkv=_Quantiser(layer.qkv, found, (i, "qkv"), fmt.group_size),
            out=_Quantiser(layer.out, found, (i, "out"), fmt.group_size),
            mlp=DenseMlp(_Quantiser(layer.mlp.gate_up, found, (i, "gate_up"), fmt.group_size),
                         _Quantiser(layer.mlp.down, found, (i, "down"), fmt.group_size)))
    run_prefill(model, calibration)
    from common.model.weights import pack_weights

    packed = pack_weights({name: t for name, t in weights.items() if not name.endswith("_proj.weight")}, fmt)
    for i in range(config.num_layers):
        for key, parts in fused_projections(config).items():
            whole = found[(i, key)]
            for name, rows in parts:
                packed[f"model.layers.{i}.{name}.weight"] = dataclasses.replace(
                    whole, packed=whole.packed[rows].clone(), scales=whole.scales[rows].clone(),
                    mins=whole.mins[rows].clone())
    return packed


def refit_ranges(weight: torch.Tensor, hessian: torch.Tensor, codes: torch.Tensor,
                 group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """With the codes fixed, each (row, group)'s scale and minimum by least squares on the output error of
    that group's inputs: argmin_{s, m} (w - s q - m)^T H_g (w - s q - m) (H's block of the group: the groups'
    couplings are left out, which keeps it a 2 x 2 system per group). NaN where the system is singular or the
    scale comes out non-positive."""
    rows, cols = weight.shape
    num_groups = -(-cols // group_size)
    scales, mins = torch.empty(rows, num_groups), torch.empty(rows, num_groups)
    h = hessian.double()
    for g in range(num_groups):
        part = slice(g * group_size, min((g + 1) * group_size, cols))
        hg, q, w = h[part, part], codes[:, part].double(), weight[:, part].double()
        ones = torch.ones_like(q)
        hq, h1 = q @ hg, ones @ hg  # (rows, g)
        a, b, c = (hq * q).sum(1), (hq * ones).sum(1), (h1 * ones).sum(1)
        d, e = (hq * w).sum(1), (h1 * w).sum(1)
        det = a * c - b * b
        s = torch.where(det > 1e-12 * a * c, (c * d - b * e) / det, torch.zeros_like(det))
        m = torch.where(det > 1e-12 * a * c, (a * e - b * d) / det, torch.zeros_like(det))
        keep = s > 0
        scales[:, g] = torch.where(keep, s, torch.nan).float()
        mins[:, g] = torch.where(keep, m, torch.nan).float()
    return scales, mins
