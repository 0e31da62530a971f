"""The draft being trained: a dense Llama in plain torch with autograd, the same math as
common/model/llama.py (whose norm and rotary helpers it uses), its parameters named as in a Hugging Face
checkpoint so `save` writes one that LlamaModel (and transformers) load as they are.

It reuses the target's tokenizer, embedding (frozen, tied to the LM head) and final norm, and starts from
a few of the target's layers. Its head scores only `head_ids`, the tokens the target writes most: the
full 49,152-row head would cost more per draft step than the layers (pdserve/distill/__init__.py).
"""

import json
import shutil
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from common.basics.model_config import ModelConfig
from common.model.draft_head import HEAD_FILE
from common.model.llama import _rms_norm, _rotary_tables, _rotate

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")


class _Norm(nn.Module):
    def __init__(self, size: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))


def _linear(n_in: int, n_out: int) -> nn.Linear:
    return nn.Linear(n_in, n_out, bias=False)


class _Layer(nn.Module):
    def __init__(self, c: ModelConfig) -> None:
        super().__init__()
        self.input_layernorm, self.post_attention_layernorm = _Norm(c.hidden_size), _Norm(c.hidden_size)
        self.self_attn = nn.Module()
        for name, size in (("q_proj", c.num_heads), ("k_proj", c.num_kv_heads), ("v_proj", c.num_kv_heads)):
            setattr(self.self_attn, name, _linear(c.hidden_size, size * c.head_dim))
        self.self_attn.o_proj = _linear(c.num_heads * c.head_dim, c.hidden_size)
        self.mlp = nn.Module()
        self.mlp.gate_proj = _linear(c.hidden_size, c.intermediate_size)
        self.mlp.up_proj = _linear(c.hidden_size, c.intermediate_size)
        self.mlp.down_proj = _linear(c.intermediate_size, c.hidden_size)


class StudentLlama(nn.Module):
    def __init__(self, config: ModelConfig, head_ids: torch.Tensor) -> None:
        super().__init__()
        self.config = config
        self.model = nn.Module()
        self.model.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.model.embed_tokens.weight.requires_grad_(False)  # the target's, shared by the tied head
        self.model.layers = nn.ModuleList(_Layer(config) for _ in range(config.num_layers))
        self.model.norm = _Norm(config.hidden_size)
        self.register_buffer("head_ids", head_ids.long(), persistent=False)  # (head tokens,)
        cos, sin_signed = _rotary_tables(config)  # (max_positions, head_dim) each
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin_signed", sin_signed, persistent=False)

    @classmethod
    def from_target(cls, target: dict[str, torch.Tensor], target_config: ModelConfig, layer_ids: list[int],
                    head_ids: torch.Tensor) -> "StudentLlama":
        """A draft of len(layer_ids) layers, each initialised from that target layer."""
        config = replace(target_config, num_layers=len(layer_ids))
        student = cls(config, head_ids)
        state = {"model.embed_tokens.weight": target["model.embed_tokens.weight"],
                 "model.norm.weight": target["model.norm.weight"]}
        for i, source in enumerate(layer_ids):
            prefix = f"model.layers.{source}."
            state |= {f"model.layers.{i}.{k[len(prefix):]}": v for k, v in target.items() if k.startswith(prefix)}
        student.load_state_dict(state)
        return student

    def hidden(self, token_ids: torch.Tensor) -> torch.Tensor:
        """token_ids (batch, tokens), right-padded -> final hidden states (batch, tokens, hidden), normed."""
        c = self.config
        batch, length = token_ids.shape
        x = self.model.embed_tokens(token_ids)  # (batch, tokens, hidden)
        # (batch * tokens, 1, head_dim) each
        cos, sin = (t[:length].repeat(batch, 1)[:, None] for t in (self.cos, self.sin_signed))
        for layer in self.model.layers:
            h = _rms_norm(x, layer.input_layernorm.weight, c.rms_norm_eps)
            attn = layer.self_attn
            q = _rotate(attn.q_proj(h).view(-1, c.num_heads, c.head_dim), cos, sin)  # (batch * tokens, heads, head_dim)
            k = _rotate(attn.k_proj(h).view(-1, c.num_kv_heads, c.head_dim), cos, sin)
            v = attn.v_proj(h).view(-1, c.num_kv_heads, c.head_dim)
            # (batch, heads, tokens, head_dim) each
            q, k, v = (t.view(batch, length, -1, c.head_dim).transpose(1, 2) for t in (q, k, v))
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
            x = x + attn.o_proj(out.transpose(1, 2).reshape(batch, length, -1))
            h = _rms_norm(x, layer.post_attention_layernorm.weight, c.rms_norm_eps)
            x = x + layer.mlp.down_proj(F.silu(layer.mlp.gate_proj(h)) * layer.mlp.up_proj(h))
        return _rms_norm(x, self.model.norm.weight, c.rms_norm_eps)

    def head_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden (rows, hidden) -> logits over the head's tokens (rows, head tokens)."""
        return hidden @ self.model.embed_tokens.weight[self.head_ids].T

    def save(self, out_dir: Path, target_dir: Path, extra_config: dict) -> None:
        """config.json, model.safetensors, draft_head.json and the target's tokenizer files into out_dir,
        each written to a temporary name first and moved into place."""
        out_dir.mkdir(parents=True, exist_ok=True)
        raw = json.loads((target_dir / "config.json").read_text())
        raw |= {"num_hidden_layers": self.config.num_layers, "tie_word_embeddings": True,
                "pdserve_draft": extra_config}
        state = {k: v.detach().contiguous() for k, v in self.state_dict().items()}
        _write(out_dir / "model.safetensors", lambda p: save_file(state, str(p), metadata={"format": "pt"}))
        _write(out_dir / HEAD_FILE, lambda p: p.write_text(json.dumps({"token_ids": self.head_ids.tolist()})))
        _write(out_dir / "config.json", lambda p: p.write_text(json.dumps(raw, indent=2)))
        for name in TOKENIZER_FILES:
            if (target_dir / name).exists():
                _write(out_dir / name, lambda p: shutil.copyfile(target_dir / name, p))


def _write(path: Path, writer) -> None:
    partial = path.with_name(path.name + ".partial")
    writer(partial)
    partial.replace(path)
