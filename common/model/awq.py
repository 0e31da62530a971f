"""Activation-aware weight quantisation (AWQ, Lin et al. 2023) for the int4 formats.

Weights that meet large activations matter most. For each linear, a per-input-channel scale s is searched
so that quantising W * s (and dividing the input by s) loses least on calibration activations:
s = mean|x|^ratio, normalised, ratio on a grid (ratio 0 is plain round-to-nearest, so AWQ never does worse
than it on the calibration set). 1/s is folded into whatever produces the input, which keeps the model
exactly equivalent before quantisation:
    q/k/v       <- input_layernorm weight       gate/up <- post_attention_layernorm weight
    o_proj      <- v_proj rows (one scale per KV-head channel, shared by the query heads of its group)
    down_proj   <- up_proj rows
Then AWQ's clipping search: each (row, group) range of the scaled weight is shrunk where that loses less on
the same activations (common/model/clip_search.py), and the folded weights are clamped to it, so plain
round-to-nearest packing quantises within the chosen ranges. As in AutoAWQ, activations come from one
forward pass of the unquantised model (common/model/calibration.py; mixture-of-experts models are refused).
"""

import dataclasses

import torch

from common.basics.model_config import ModelConfig
from common.model.calibration import calibration_model, check_supported, fused_projections, run_prefill
from common.model.clip_search import gram, search_clip_ranges
from common.model.linear import WeightFormat
from common.model.mlp import DenseMlp
from common.model.packed import replicate_pad_columns
from common.model.quant_int4 import fake_quantize_groups

GRID = 10  # ratios 0, 0.1, ..., 0.9 (AutoAWQ searches 20; 10 halves calibration time on these CPUs)


def search_scale(x: torch.Tensor, weight: torch.Tensor, group_size: int,
                 shared_groups: tuple[int, int, int] | None = None) -> torch.Tensor:
    """x (tokens, in), weight (out, in) -> s (in,) minimising |x W^T - (x / s) Q(W s)^T|^2.
    shared_groups (kv_heads, group, head_dim): one scale per KV-head channel, repeated over the group."""
    x_mean = x.abs().mean(dim=0)
    if shared_groups is not None:
        x_mean = x_mean.view(shared_groups).mean(dim=1, keepdim=True).expand(shared_groups).reshape(-1)
    reference = x @ weight.T
    best_loss, best = float("inf"), torch.ones_like(x_mean)
    for step in range(GRID):
        s = x_mean.pow(step / GRID).clamp(min=1e-4)
        s = s / (s.max() * s.min()).sqrt()
        dequantised = fake_quantize_int4(weight * s, group_size) / s
        loss = (x @ dequantised.T - reference).pow(2).mean().item()
        if loss < best_loss:
            best_loss, best = loss, s
    return best


def fake_quantize_int4(weight: torch.Tensor, group_size: int) -> torch.Tensor:
    """What Int4Weight.pack followed by dequantize_rows gives (fp16 scale and min included), without the
    nibble packing: the search calls this GRID times per linear."""
    rows, cols = weight.shape
    groups = replicate_pad_columns(weight, group_size).view(rows, -1, group_size)
    return fake_quantize_groups(groups, groups.amin(dim=2), groups.amax(dim=2)).view(rows, -1)[:, :cols]


@dataclasses.dataclass(frozen=True)
class AwqChoice:
    scale: torch.Tensor  # (in,): the weight is multiplied by it, the input divided
    clip: tuple[torch.Tensor, torch.Tensor] | None  # (low, high) per (row, group) of the scaled weight, or none


class _Searcher:
    """Stands in for a dense linear during calibration: searches its scale, then the clipping of the scaled
    weight, on the activations it sees."""

    def __init__(self, inner, found: dict, key: tuple[int, str], group_size: int, clip: bool,
                 shared_groups=None) -> None:
        self.inner, self.found, self.key = inner, found, key
        self.group_size, self.clip, self.shared_groups = group_size, clip, shared_groups

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x32, weight = x.float(), self.inner.weight.float()
        s = search_scale(x32, weight, self.group_size, self.shared_groups)
        clip = search_clip_ranges(weight * s, gram(x32 / s), self.group_size) if self.clip else None
        self.found[self.key] = AwqChoice(s, clip)
        return self.inner(x)


def search_scales(config: ModelConfig, weights: dict[str, torch.Tensor], calibration: list[list[int]],
                  group_size: int, clip: bool) -> dict[tuple[int, str], AwqChoice]:
    """{(layer, "qkv" | "out" | "gate_up" | "down"): choice} from one batched prefill of the calibration
    sequences."""
    model = calibration_model(config, weights)
    found: dict[tuple[int, str], AwqChoice] = {}
    heads = (config.num_kv_heads, config.num_heads // config.num_kv_heads, config.head_dim)
    for i, layer in enumerate(model.layers):
        model.layers[i] = dataclasses.replace(
            layer, qkv=_Searcher(layer.qkv, found, (i, "qkv"), group_size, clip),
            out=_Searcher(layer.out, found, (i, "out"), group_size, clip, heads),
            mlp=DenseMlp(_Searcher(layer.mlp.gate_up, found, (i, "gate_up"), group_size, clip),
                         _Searcher(layer.mlp.down, found, (i, "down"), group_size, clip)))
    run_prefill(model, calibration)
    return found


def apply_awq(config: ModelConfig, weights: dict[str, torch.Tensor], calibration: list[list[int]],
              fmt: WeightFormat, clip: bool = True) -> dict[str, torch.Tensor]:
    """Dense weights with AWQ scales folded in (the same function in full precision, easier to quantise),
    clamped to the clipping search's ranges where `clip` (then no longer the same function: the clamp is
    what quantisation would do to them anyway, within a range chosen to lose least)."""
    check_supported(config, fmt)
    choices = search_scales(config, weights, calibration, fmt.group_size, clip)
    w = {name: tensor.float().clone() for name, tensor in weights.items()}
    kv_heads, group, head_dim = config.num_kv_heads, config.num_heads // config.num_kv_heads, config.head_dim
    q_rows, kv_rows = config.num_heads * head_dim, kv_heads * head_dim
    for i in range(config.num_layers):
        p = f"model.layers.{i}."
        qkv, out, gate_up, down = (choices[(i, key)] for key in ("qkv", "out", "gate_up", "down"))
        w[p + "input_layernorm.weight"] /= qkv.scale
        for name in ("q", "k", "v"):
            w[p + f"self_attn.{name}_proj.weight"] *= qkv.scale
        v_rows = out.scale.view(kv_heads, group, head_dim)[:, 0].reshape(-1)
        w[p + "self_attn.v_proj.weight"] /= v_rows[:, None]
        w[p + "self_attn.o_proj.weight"] *= out.scale
        w[p + "post_attention_layernorm.weight"] /= gate_up.scale
        for name in ("gate", "up"):
            w[p + f"mlp.{name}_proj.weight"] *= gate_up.scale
        w[p + "mlp.up_proj.weight"] /= down.scale[:, None]
        w[p + "mlp.down_proj.weight"] *= down.scale
        if not clip:
            continue
        # Ranges were searched before the row scalings folded in after them (v rows by o_proj's scale, up rows
        # by down_proj's): a row divided by c has its range divided by c.
        row_scales = {"qkv": torch.cat([torch.ones(q_rows + kv_rows), 1 / v_rows]),
                      "gate_up": torch.cat([torch.ones(config.intermediate_size), 1 / down.scale])}
        for key, parts in fused_projections(config).items():
            low, high = choices[(i, key)].clip
            if key in row_scales:
                low, high = low * row_scales[key][:, None], high * row_scales[key][:, None]
            for name, rows in parts:
                w[p + name + ".weight"] = clamp_to_ranges(w[p + name + ".weight"], low[rows], high[rows],
                                                          fmt.group_size)
    return w


def clamp_to_ranges(weight: torch.Tensor, low: torch.Tensor, high: torch.Tensor, group_size: int) -> torch.Tensor:
    """weight (rows, in) clamped to per-(row, group) ranges (rows, groups)."""
    column_groups = torch.arange(weight.shape[1]) // group_size
    return torch.minimum(torch.maximum(weight, low[:, column_groups]), high[:, column_groups])
