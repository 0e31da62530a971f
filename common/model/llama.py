"""A Llama-family decoder in plain torch, reading and writing its KV through a paged KvPool.

Two entry points, because they are different workloads: `prefill` runs the tokens of one or more
prompts (or chunks of them) through every layer at once, attention per prompt over its own context;
`decode` runs one new token (or a few) for each sequence of a batch, attention as
common/model/decode_attention.py does it (per sequence on CPU; on CUDA the Triton paged-attention kernel, or
padded groups for steps with speculated drafts).

Each layer's MLP is a callable: a dense SwiGLU (common/model/mlp.py) for Llama, a sparse mixture of experts
(common/model/moe.py) for Mixtral. Both entry points take an optional (layers, experts) int64 `expert_load`
that MoE layers add their routing counts to; dense models ignore it.
"""

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from common.basics.model_config import ModelConfig
from common.kv.pool import KvPool
from common.kv.quant import KvRows
from common.model.decode_attention import DecodeAttention, DecodeBatch
from common.model.linear import DenseLinear, PackedLinear, make_linear
from common.model.mlp import DenseMlp
from common.model.moe import MoeMlp, split_experts

# Called once per layer during prefill with the keys (after rotary) and values just computed, as the pool
# stored them (quantised, with scales, for an int8 / fp8 pool): (layer, rows of num_tokens).
LayerKvHook = Callable[[int, KvRows], None]


@dataclass(frozen=True)
class LayerWeights:
    input_norm: torch.Tensor  # (hidden,)
    qkv: DenseLinear  # hidden -> (heads + 2 * kv_heads) * head_dim
    out: DenseLinear  # heads * head_dim -> hidden
    post_norm: torch.Tensor  # (hidden,)
    mlp: DenseMlp | MoeMlp  # hidden -> hidden


@dataclass(frozen=True)
class PrefillSpan:
    """One prompt chunk inside a prefill batch: tokens [offset, offset + num_tokens) of the batch."""

    offset: int
    num_tokens: int
    start: int  # position of the chunk's first token in its sequence
    context_slots: torch.Tensor  # (start + num_tokens,) KV slots of positions 0 .. end-1


class LlamaModel:
    def __init__(self, config: ModelConfig, weights: dict[str, torch.Tensor], dtype: torch.dtype,
                 device: torch.device | str = "cpu", weight_format: str = "dense") -> None:
        self.config = config
        self.device = torch.device(device)
        w = {name: tensor.to(self.device, dtype) for name, tensor in weights.items()}
        self.embed = w["model.embed_tokens.weight"]  # (vocab, hidden)
        if isinstance(self.embed, torch.Tensor) and not config.tie_word_embeddings:
            self.embed = self.embed.clone()  # its own memory, not a view of the checkpoint's map (see _layer)
        self.lm_head = make_linear(self.embed if config.tie_word_embeddings else w["lm_head.weight"], weight_format)
        if config.tie_word_embeddings and isinstance(self.lm_head, DenseLinear):
            self.embed = self.lm_head.weight  # the head's transposed copy serves lookups too: one copy held
        self.final_norm = w["model.norm.weight"].clone()  # see _layer: kept tensors own their memory
        self.layers = [self._layer(config, w, i, weight_format) for i in range(config.num_layers)]
        cos, sin_signed = _rotary_tables(config)  # (max_positions, head_dim) each
        self.cos, self.sin_signed = cos.to(self.device, dtype), sin_signed.to(self.device, dtype)
        self.group = config.num_heads // config.num_kv_heads
        self.decode_attention = DecodeAttention(config)

    def linears(self) -> list:
        """Every linear layer: the LM head, then each layer's qkv, out and MLP (all experts')."""
        return [self.lm_head] + [linear for layer in self.layers
                                 for linear in (layer.qkv, layer.out, *layer.mlp.linears())]

    def add_blocked_copies(self) -> int:
        """Gives every linear the second copy its CPU kernel reads fastest: oneDNN-blocked float32 for products
        of several rows (DenseLinear), FBGEMM-packed fp16 (PackedLinear over fp16 weights); returns how many
        got one (none off CPU, nor in the other formats). fp16 projections then keep only their packed copy,
        which serves all their products; the LM head keeps both, its rows being the tied embedding's lookups."""
        added = sum(linear.add_blocked_copy() for linear in self.linears())
        for linear in self.linears()[1:]:
            if isinstance(linear, PackedLinear):
                linear.drop_unpacked()
        return added

    @classmethod
    def load(cls, model_dir: Path, dtype: torch.dtype = torch.float32,
             device: torch.device | str = "cpu") -> "LlamaModel":
        config = ModelConfig.from_dir(model_dir)
        weights: dict[str, torch.Tensor] = {}
        for path in sorted(model_dir.glob("*.safetensors")):
            weights.update(load_file(str(path)))
        return cls(config, split_experts(weights), dtype, device)

    @staticmethod
    def _layer(config: ModelConfig, w: dict[str, torch.Tensor], i: int, weight_format: str) -> LayerWeights:
        p = f"model.layers.{i}."
        if config.is_moe:
            mlp = MoeMlp.from_layer(w, p + "mlp.", config.num_experts, config.num_experts_per_tok, weight_format)
        else:
            mlp = DenseMlp.from_weights(w, p + "mlp.", weight_format)
        # Norms are kept as loaded: clones, not views of the checkpoint's memory map, which a single view would keep
        # mapped and resident (the whole file, 513 MiB for the default model) after the projections were copied
        # out of it.
        return LayerWeights(
            input_norm=w[p + "input_layernorm.weight"].clone(),
            qkv=make_linear(torch.cat([w[p + f"self_attn.{n}_proj.weight"] for n in ("q", "k", "v")]), weight_format),
            out=make_linear(w[p + "self_attn.o_proj.weight"], weight_format),
            post_norm=w[p + "post_attention_layernorm.weight"].clone(),
            mlp=mlp,
        )

    def prefill(self, token_ids: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor,
                spans: list[PrefillSpan], kv: KvPool, on_layer_kv: LayerKvHook | None = None,
                expert_load: torch.Tensor | None = None, every_position: bool = False) -> torch.Tensor:
        """Runs prompt tokens (num_tokens,); returns logits (len(spans), vocab) at each span's last token, or with
        every_position (the fidelity harness's long texts) (num_tokens, vocab) at every token."""

        def attend(layer: int, q: torch.Tensor) -> torch.Tensor:
            return torch.cat([self._attend_span(layer, q, span, kv) for span in spans])

        hidden = self._forward(token_ids, positions, slots, kv, attend, on_layer_kv, expert_load)
        if every_position:
            return self._logits(hidden)
        last = torch.tensor([span.offset + span.num_tokens - 1 for span in spans], device=self.device)
        return self._logits(hidden[last])

    def decode(self, batch: DecodeBatch, kv: KvPool, expert_load: torch.Tensor | None = None) -> torch.Tensor:
        """Runs a few new tokens per sequence; returns logits (num_tokens, vocab), one row per token."""
        attend = self.decode_attention.for_batch(batch, kv)
        hidden = self._forward(batch.token_ids, batch.positions, batch.slots, kv, attend, None, expert_load)
        return self._logits(hidden)

    def _forward(self, token_ids, positions, slots, kv: KvPool, attend, on_layer_kv, expert_load) -> torch.Tensor:
        c = self.config
        loads = expert_load if expert_load is not None else [None] * c.num_layers  # (layers, experts)
        x = self.embed[token_ids]  # (tokens, hidden)
        cos, sin = self.cos[positions][:, None], self.sin_signed[positions][:, None]  # (tokens, 1, head_dim)
        q_size, kv_size, eps = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim, c.rms_norm_eps
        for index, (layer, load) in enumerate(zip(self.layers, loads)):
            qkv = layer.qkv(_rms_norm(x, layer.input_norm, eps))
            # queries and keys rotated in one pass: (tokens, heads + kv_heads, head_dim)
            qk = _rotate(qkv[:, :q_size + kv_size].view(-1, c.num_heads + c.num_kv_heads, c.head_dim), cos, sin)
            q, k = qk[:, :c.num_heads], qk[:, c.num_heads:]  # (tokens, heads | kv_heads, head_dim)
            v = qkv[:, q_size + kv_size:].view(-1, c.num_kv_heads, c.head_dim)
            stored = kv.write(index, slots, k, v)
            if on_layer_kv is not None:
                on_layer_kv(index, stored)
            x = x + layer.out(attend(index, q))
            x = x + layer.mlp(_rms_norm(x, layer.post_norm, eps), load)
        return x

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(_rms_norm(hidden, self.final_norm, self.config.rms_norm_eps)).float()

    def _attend_span(self, layer: int, q: torch.Tensor, span: PrefillSpan, kv: KvPool) -> torch.Tensor:
        q = q[span.offset:span.offset + span.num_tokens].transpose(0, 1)  # (heads, tokens, head_dim)
        k, v = kv.read_slots(layer, span.context_slots)  # (context, kv_heads, head_dim) each
        k, v = k.to(q.dtype).transpose(0, 1), v.to(q.dtype).transpose(0, 1)  # (kv_heads, context, head_dim)
        # Query heads as (kv_heads, group) against K/V expanded without a copy: torch's fused CPU attention
        # takes this form, while enable_gqa falls back to the unfused math (4x slower at 1,024 tokens here).
        kv_heads, context = k.shape[0], k.shape[1]
        q = q.reshape(kv_heads, self.group, span.num_tokens, -1)  # (kv_heads, group, tokens, head_dim)
        k = k[:, None].expand(kv_heads, self.group, context, k.shape[-1])
        v = v[:, None].expand(kv_heads, self.group, context, v.shape[-1])
        if span.start == 0:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            rows = torch.arange(span.start, span.start + span.num_tokens, device=q.device)[:, None]
            mask = torch.arange(span.start + span.num_tokens, device=q.device)[None, :] <= rows  # (tokens, context)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        out = out.reshape(kv_heads * self.group, span.num_tokens, -1)  # (heads, tokens, head_dim)
        return out.transpose(0, 1).reshape(span.num_tokens, -1)  # (tokens, heads * head_dim)

def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """weight * x / sqrt(mean(x^2) + eps), as Hugging Face's LlamaRMSNorm computes it, in one torch call."""
    return F.rms_norm(x, weight.shape, weight, eps)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    """Rotary embedding in Hugging Face's rotate_half layout: x * cos + cat(-x2, x1) * sin, where x1 and x2
    are x's halves. Swapping the halves (flip over a (2, half) view) and multiplying by sin_signed, sin with
    the first half negated, gives the same products. x: (tokens, heads, head_dim); cos, sin_signed: (tokens, 1,
    head_dim)."""
    swapped = x.unflatten(-1, (2, -1)).flip(-2).flatten(-2)
    return torch.addcmul(x * cos, swapped, sin_signed)


def _rotary_tables(config: ModelConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin_signed per position, (max_positions, head_dim) each: sin_signed is sin with its first
    half negated, the sign rotate_half gives (see _rotate)."""
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    positions = torch.arange(config.max_position_embeddings).float()
    freqs = positions[:, None] * inv_freq[None, :]  # (positions, head_dim / 2)
    return torch.cat((freqs, freqs), dim=-1).cos(), torch.cat((-freqs.sin(), freqs.sin()), dim=-1)
