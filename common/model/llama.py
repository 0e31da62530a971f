"""A Llama-family decoder in plain torch, reading and writing its KV through a paged KvPool.

Two entry points, because they are different workloads: `prefill` runs the tokens of one or more
prompts (or chunks of them) through every layer at once, attention per prompt over its own context;
`decode` runs one new token for each sequence of a batch, attention over a padded gather of each
sequence's KV slots.
"""

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from common.kv_pool import KvPool
from common.model.config import ModelConfig
from common.model.linear import DenseLinear, make_linear

# Called once per layer during prefill with the keys (after rotary) and values just computed:
# (layer, key (num_tokens, num_kv_heads, head_dim), value (same)).
LayerKvHook = Callable[[int, torch.Tensor, torch.Tensor], None]


@dataclass(frozen=True)
class LayerWeights:
    input_norm: torch.Tensor  # (hidden,)
    qkv: DenseLinear  # hidden -> (heads + 2 * kv_heads) * head_dim
    out: DenseLinear  # heads * head_dim -> hidden
    post_norm: torch.Tensor  # (hidden,)
    gate_up: DenseLinear  # hidden -> 2 * intermediate
    down: DenseLinear  # intermediate -> hidden


@dataclass(frozen=True)
class PrefillSpan:
    """One prompt chunk inside a prefill batch: tokens [offset, offset + num_tokens) of the batch."""

    offset: int
    num_tokens: int
    start: int  # position of the chunk's first token in its sequence
    context_slots: torch.Tensor  # (start + num_tokens,) KV slots of positions 0 .. end-1


@dataclass(frozen=True)
class DecodeBatch:
    """A few new tokens per sequence (one, or more when verifying speculated tokens).

    Token rows are flattened (num_tokens = sum over sequences); attention pads them to
    (batch, max_new, ...) where row `query_rows[i]` = sequence * max_new + offset holds token i.
    """

    token_ids: torch.Tensor  # (num_tokens,)
    positions: torch.Tensor  # (num_tokens,)
    slots: torch.Tensor  # (num_tokens,) where each new token's KV goes
    query_rows: torch.Tensor  # (num_tokens,) row of each token in the padded (batch * max_new) layout
    max_new: int
    block_tables: torch.Tensor  # (batch, max_blocks) each sequence's blocks, padded with block 0
    context_mask: torch.Tensor  # (batch, max_new, 1, max_blocks * block_size) 0 where a query may look, else -inf


class LlamaModel:
    def __init__(self, config: ModelConfig, weights: dict[str, torch.Tensor], dtype: torch.dtype,
                 device: torch.device | str = "cpu", weight_format: str = "dense") -> None:
        self.config = config
        self.device = torch.device(device)
        w = {name: tensor.to(self.device, dtype) for name, tensor in weights.items()}
        self.embed = w["model.embed_tokens.weight"]  # (vocab, hidden)
        self.lm_head = make_linear(self.embed if config.tie_word_embeddings else w["lm_head.weight"], weight_format)
        self.final_norm = w["model.norm.weight"]
        self.layers = [self._layer(w, i, weight_format) for i in range(config.num_layers)]
        cos, sin = _rotary_tables(config)  # (max_positions, head_dim) each
        self.cos, self.sin = cos.to(self.device, dtype), sin.to(self.device, dtype)
        self.group = config.num_heads // config.num_kv_heads
        self.scale = config.head_dim**-0.5

    @classmethod
    def load(cls, model_dir: Path, dtype: torch.dtype = torch.float32,
             device: torch.device | str = "cpu") -> "LlamaModel":
        config = ModelConfig.from_dir(model_dir)
        weights: dict[str, torch.Tensor] = {}
        for path in sorted(model_dir.glob("*.safetensors")):
            weights.update(load_file(str(path)))
        return cls(config, weights, dtype, device)

    @staticmethod
    def _layer(w: dict[str, torch.Tensor], i: int, weight_format: str) -> LayerWeights:
        p = f"model.layers.{i}."
        return LayerWeights(
            input_norm=w[p + "input_layernorm.weight"],
            qkv=make_linear(torch.cat([w[p + f"self_attn.{n}_proj.weight"] for n in ("q", "k", "v")]), weight_format),
            out=make_linear(w[p + "self_attn.o_proj.weight"], weight_format),
            post_norm=w[p + "post_attention_layernorm.weight"],
            gate_up=make_linear(torch.cat([w[p + "mlp.gate_proj.weight"], w[p + "mlp.up_proj.weight"]]), weight_format),
            down=make_linear(w[p + "mlp.down_proj.weight"], weight_format),
        )

    def prefill(self, token_ids: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor,
                spans: list[PrefillSpan], kv: KvPool, on_layer_kv: LayerKvHook | None = None) -> torch.Tensor:
        """Runs prompt tokens (num_tokens,); returns logits (len(spans), vocab) at each span's last token."""

        def attend(layer: int, q: torch.Tensor) -> torch.Tensor:
            return torch.cat([self._attend_span(layer, q, span, kv) for span in spans])

        hidden = self._forward(token_ids, positions, slots, kv, attend, on_layer_kv)
        last = torch.tensor([span.offset + span.num_tokens - 1 for span in spans], device=self.device)
        return self._logits(hidden[last])

    def decode(self, batch: DecodeBatch, kv: KvPool) -> torch.Tensor:
        """Runs a few new tokens per sequence; returns logits (num_tokens, vocab), one row per token."""

        def attend(layer: int, q: torch.Tensor) -> torch.Tensor:
            return self._attend_batch(layer, q, batch, kv)

        hidden = self._forward(batch.token_ids, batch.positions, batch.slots, kv, attend, None)
        return self._logits(hidden)

    def _forward(self, token_ids, positions, slots, kv: KvPool, attend, on_layer_kv) -> torch.Tensor:
        c = self.config
        x = self.embed[token_ids]  # (tokens, hidden)
        cos, sin = self.cos[positions], self.sin[positions]  # (tokens, head_dim)
        q_size, kv_size = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
        for index, layer in enumerate(self.layers):
            h = _rms_norm(x, layer.input_norm, c.rms_norm_eps)
            q, k, v = layer.qkv(h).split([q_size, kv_size, kv_size], dim=-1)
            q = _rotate(q.view(-1, c.num_heads, c.head_dim), cos, sin)  # (tokens, heads, head_dim)
            k = _rotate(k.view(-1, c.num_kv_heads, c.head_dim), cos, sin)  # (tokens, kv_heads, head_dim)
            v = v.reshape(-1, c.num_kv_heads, c.head_dim)
            kv.write(index, slots, k, v)
            if on_layer_kv is not None:
                on_layer_kv(index, k, v)
            x = x + layer.out(attend(index, q))
            h = _rms_norm(x, layer.post_norm, c.rms_norm_eps)
            gate, up = layer.gate_up(h).chunk(2, dim=-1)
            x = x + layer.down(F.silu(gate) * up)
        return x

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(_rms_norm(hidden, self.final_norm, self.config.rms_norm_eps)).float()

    def _attend_span(self, layer: int, q: torch.Tensor, span: PrefillSpan, kv: KvPool) -> torch.Tensor:
        q = q[span.offset:span.offset + span.num_tokens].transpose(0, 1)  # (heads, tokens, head_dim)
        k, v = kv.read_slots(layer, span.context_slots)  # (context, kv_heads, head_dim) each
        k, v = k.to(q.dtype).transpose(0, 1), v.to(q.dtype).transpose(0, 1)  # (kv_heads, context, head_dim)
        if span.start == 0:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        else:
            rows = torch.arange(span.start, span.start + span.num_tokens, device=q.device)[:, None]
            mask = torch.arange(span.start + span.num_tokens, device=q.device)[None, :] <= rows  # (tokens, context)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
        return out.transpose(0, 1).reshape(span.num_tokens, -1)  # (tokens, heads * head_dim)

    def _attend_batch(self, layer: int, q: torch.Tensor, batch: DecodeBatch, kv: KvPool) -> torch.Tensor:
        c = self.config
        num_seqs, max_new = batch.block_tables.shape[0], batch.max_new
        padded = q.new_zeros(num_seqs * max_new, c.num_heads, c.head_dim).index_copy_(0, batch.query_rows, q)
        padded = (padded * self.scale).view(num_seqs, max_new, c.num_kv_heads, self.group, c.head_dim)
        k, v = kv.read_blocks(layer, batch.block_tables)  # (batch, context, kv_heads, head_dim) each
        k, v = k.to(q.dtype), v.to(q.dtype)
        # One batched matmul per KV head on strided views: BLAS reads them in place, where a permute
        # to (batch, kv_heads, ...) would copy the whole gathered context first (25x slower here).
        outs = []
        for head in range(c.num_kv_heads):
            q_head = padded[:, :, head].reshape(num_seqs, max_new * self.group, c.head_dim)
            scores = (q_head @ k[:, :, head].transpose(1, 2)).view(num_seqs, max_new, self.group, -1)
            probs = torch.softmax(scores + batch.context_mask, dim=-1)  # (batch, max_new, group, context)
            out = probs.view(num_seqs, max_new * self.group, -1) @ v[:, :, head]  # (batch, max_new * group, head_dim)
            outs.append(out.view(num_seqs, max_new, self.group, c.head_dim))
        out = torch.stack(outs, dim=2).reshape(num_seqs * max_new, -1)  # (batch * max_new, heads * head_dim)
        return out.index_select(0, batch.query_rows)


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    variance = x.pow(2).mean(-1, keepdim=True)
    return weight * (x * torch.rsqrt(variance + eps))


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding in Hugging Face's rotate_half layout; x: (tokens, heads, head_dim)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]


def _rotary_tables(config: ModelConfig) -> tuple[torch.Tensor, torch.Tensor]:
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    positions = torch.arange(config.max_position_embeddings).float()
    freqs = positions[:, None] * inv_freq[None, :]  # (positions, head_dim / 2)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()
