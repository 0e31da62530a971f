"""Clipping search for int4 group ranges (AWQ's auto-clip, also GPTQ's static groups here).

A group's range need not be its minimum and maximum: shrinking it clips the one or two largest weights but
makes the 16 levels finer for all the others. Which range loses least depends on the activations the weight
meets, so each (row, group) range is chosen to minimise the output error on calibration inputs x:

    loss(row, group) = |x_g (w_g - Q(w_g))^T|^2 = e H_g e^T,   e = w_g - Q(w_g),   H_g = x_g^T x_g

where x_g are the group's input columns and H_g its block of the input Gram matrix, so only H is needed,
not the activations. Candidates as in AutoAWQ: the range clamped to [-m r, m r], m = max |w_g|, for shrink
ratios r = 1, 0.975, ..., 0.5 (r = 1 keeps the plain range, so the search never does worse than it on the
calibration inputs).
"""

import torch

from common.model.packed import replicate_pad_columns
from common.model.quant_int4 import fake_quantize_groups, group_ranges

GRID = 20
MAX_SHRINK = 0.5


def gram(x: torch.Tensor) -> torch.Tensor:
    """x (tokens, in) -> H = x^T x / tokens in float64 (in, in)."""
    x = x.reshape(-1, x.shape[-1]).double()
    return x.T @ x / x.shape[0]


def search_clip_ranges(weight: torch.Tensor, hessian: torch.Tensor, group_size: int,
                       row_chunk: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """(low, high) per (row, group), fp32, each the candidate range with least output error under H."""
    rows, cols = weight.shape
    low, high = group_ranges(weight, group_size)
    padded = replicate_pad_columns(weight.float(), group_size)
    num_groups = padded.shape[1] // group_size
    # H blocks of each group (padding columns get zero rows and columns: they are not real inputs).
    h = torch.zeros(num_groups * group_size, num_groups * group_size, dtype=torch.float32)
    h[:cols, :cols] = hessian.float()
    blocks = torch.stack([h[g * group_size:(g + 1) * group_size, g * group_size:(g + 1) * group_size]
                          for g in range(num_groups)])  # (groups, g, g)
    for start in range(0, rows, row_chunk):
        part = slice(start, start + row_chunk)
        w = padded[part].view(-1, num_groups, group_size)  # (r, groups, g)
        reach = w.abs().amax(dim=2)
        best_loss = torch.full(reach.shape, float("inf"))
        for step in range(GRID + 1):
            ratio = 1 - MAX_SHRINK * step / GRID
            lo = torch.maximum(low[part], -reach * ratio)
            hi = torch.maximum(torch.minimum(high[part], reach * ratio), lo)  # an all-positive group: lo > m r
            error = (w - fake_quantize_groups(w, lo, hi)).transpose(0, 1)  # (groups, r, g)
            loss = (torch.bmm(error, blocks) * error).sum(dim=2).T  # (r, groups)
            better = loss < best_loss
            best_loss = torch.where(better, loss, best_loss)
            low[part] = torch.where(better, lo, low[part])
            high[part] = torch.where(better, hi, high[part])
    return low, high

