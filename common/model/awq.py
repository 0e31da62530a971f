"""Activation-aware weight quantisation (AWQ, Lin et al. 2023) for the int4 formats.

Weights that meet large activations matter most. For each linear, a per-input-channel scale s is searched
so that quantising W * s (and dividing the input by s) loses least on calibration activations:
s = mean|x|^ratio, normalised, ratio on a grid (ratio 0 is plain round-to-nearest, so AWQ never does worse
than it on the calibration set). 1/s is folded into whatever produces the input, which keeps the model
exactly equivalent before quantisation:
    q/k/v       <- input_layernorm weight       gate/up <- post_attention_layernorm weight
    o_proj      <- v_proj rows (one scale per KV-head channel, shared by the query heads of its group)
    down_proj   <- up_proj rows
As in AutoAWQ, activations come from one forward pass of the unquantised model. AutoAWQ's extra clipping
search is not done here. Mixture-of-experts models are refused: each expert sees only the tokens routed to it,
so its scales would need per-expert calibration (and folding into a shared norm no longer fits); their int4
formats round to nearest per expert (int4-g32/g64/g128).
"""

import dataclasses
from pathlib import Path

import torch

from common.basics.model_config import ModelConfig
from common.kv.pool import KvPool
from common.model.linear import WeightFormat
from common.model.llama import LlamaModel
from common.model.mlp import DenseMlp
from common.model.packed import replicate_pad_columns
from common.model.quant_int4 import INT4_MAX
from common.model.runner import ModelRunner, PrefillChunk

GRID = 10  # ratios 0, 0.1, ..., 0.9 (AutoAWQ searches 20; 10 halves calibration time on these CPUs)
CALIBRATION_FILE = Path(__file__).with_name("awq_calibration.txt")
CALIBRATION_TOKENS = 512
SEQUENCE_TOKENS = 128


def calibration_token_ids(model_dir: Path) -> list[list[int]]:
    """The calibration texts (paragraphs of awq_calibration.txt), tokenised and cut into sequences."""
    from common.basics.tokenizer import TextTokenizer

    tokenizer = TextTokenizer(model_dir)
    ids: list[int] = []
    for paragraph in CALIBRATION_FILE.read_text().split("\n\n"):
        ids += tokenizer.encode(paragraph.strip() + "\n")
    ids = ids[:CALIBRATION_TOKENS]
    return [ids[i:i + SEQUENCE_TOKENS] for i in range(0, len(ids), SEQUENCE_TOKENS)]


def check_supported(config: ModelConfig, fmt: WeightFormat) -> None:
    if config.is_moe:
        raise ValueError(f"weight format {fmt.name!r}: AWQ calibration is not supported for mixture-of-experts "
                         f"models; use int4-g{fmt.group_size} (round-to-nearest int4, quantised per expert)")


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
    low = groups.amin(dim=2, keepdim=True).half().float()
    scale = ((groups.amax(dim=2, keepdim=True) - groups.amin(dim=2, keepdim=True)) / INT4_MAX).half().float()
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    codes = groups.sub(low).div_(scale).round_().clamp_(0, INT4_MAX)
    return codes.mul_(scale).add_(low).view(rows, -1)[:, :cols]


class _Searcher:
    """Stands in for a dense linear during calibration: searches its scale on the activations it sees."""

    def __init__(self, inner, found: dict, key: tuple[int, str], group_size: int, shared_groups=None) -> None:
        self.inner, self.found, self.key = inner, found, key
        self.group_size, self.shared_groups = group_size, shared_groups

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.found[self.key] = search_scale(x.float(), self.inner.weight.float(), self.group_size,
                                            self.shared_groups)
        return self.inner(x)


def search_scales(config: ModelConfig, weights: dict[str, torch.Tensor], calibration: list[list[int]],
                  group_size: int) -> dict[tuple[int, str], torch.Tensor]:
    """{(layer, "qkv" | "out" | "gate_up" | "down"): s} from one batched prefill of the calibration sequences."""
    model = LlamaModel(config, weights, torch.float32, "cpu", weight_format="fp32")
    found: dict[tuple[int, str], torch.Tensor] = {}
    heads = (config.num_kv_heads, config.num_heads // config.num_kv_heads, config.head_dim)
    for i, layer in enumerate(model.layers):
        model.layers[i] = dataclasses.replace(
            layer, qkv=_Searcher(layer.qkv, found, (i, "qkv"), group_size),
            out=_Searcher(layer.out, found, (i, "out"), group_size, heads),
            mlp=DenseMlp(_Searcher(layer.mlp.gate_up, found, (i, "gate_up"), group_size),
                         _Searcher(layer.mlp.down, found, (i, "down"), group_size)))
    block_size = 16
    num_blocks = sum(-(-len(ids) // block_size) for ids in calibration)
    kv = KvPool(num_layers=config.num_layers, num_blocks=num_blocks, block_size=block_size,
                num_kv_heads=config.num_kv_heads, head_dim=config.head_dim, dtype=torch.float32)
    chunks, next_block = [], 0
    for ids in calibration:
        count = -(-len(ids) // block_size)
        chunks.append(PrefillChunk(ids, 0, list(range(next_block, next_block + count))))
        next_block += count
    ModelRunner(model, kv).run_prefill(chunks)
    return found


def apply_awq(config: ModelConfig, weights: dict[str, torch.Tensor], calibration: list[list[int]],
              fmt: WeightFormat) -> dict[str, torch.Tensor]:
    """Dense weights with AWQ scales folded in: the same function in full precision, easier to quantise."""
    check_supported(config, fmt)
    scales = search_scales(config, weights, calibration, fmt.group_size)
    w = {name: tensor.float().clone() for name, tensor in weights.items()}
    kv_heads, group, head_dim = config.num_kv_heads, config.num_heads // config.num_kv_heads, config.head_dim
    for i in range(config.num_layers):
        p = f"model.layers.{i}."
        s = scales[(i, "qkv")]
        w[p + "input_layernorm.weight"] /= s
        for name in ("q", "k", "v"):
            w[p + f"self_attn.{name}_proj.weight"] *= s
        s = scales[(i, "out")]
        w[p + "self_attn.v_proj.weight"] /= s.view(kv_heads, group, head_dim)[:, 0].reshape(-1, 1)
        w[p + "self_attn.o_proj.weight"] *= s
        s = scales[(i, "gate_up")]
        w[p + "post_attention_layernorm.weight"] /= s
        for name in ("gate", "up"):
            w[p + f"mlp.{name}_proj.weight"] *= s
        s = scales[(i, "down")]
        w[p + "mlp.up_proj.weight"] /= s[:, None]
        w[p + "mlp.down_proj.weight"] *= s
    return w
