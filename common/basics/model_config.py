"""The shape of a Llama-family checkpoint, read from its Hugging Face config.json.

Llama and Mixtral share everything but the MLP: Mixtral's is a sparse mixture of experts (num_experts
SwiGLU experts, num_experts_per_tok of them per token; common/model/moe.py). A dense model has
num_experts = 0.
"""

import json
from dataclasses import dataclass
from pathlib import Path

# model_type -> the config.json keys of (num_experts, num_experts_per_tok); None for a dense MLP.
MODEL_TYPES: dict[str, tuple[str, str] | None] = {
    "llama": None,
    "mixtral": ("num_local_experts", "num_experts_per_tok"),
}


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int  # of one expert, for a mixture of experts
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    eos_token_ids: tuple[int, ...]
    num_experts: int = 0  # 0: a dense MLP
    num_experts_per_tok: int = 0

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")
        if self.num_experts and not 1 <= self.num_experts_per_tok <= self.num_experts:
            raise ValueError(f"num_experts_per_tok {self.num_experts_per_tok} must be in [1, {self.num_experts}]")

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    @classmethod
    def from_dir(cls, model_dir: Path) -> "ModelConfig":
        raw = json.loads((model_dir / "config.json").read_text())
        model_type = raw.get("model_type")
        if model_type not in MODEL_TYPES:
            raise ValueError(f"{model_dir}: model_type {model_type!r} is not supported (expected one of "
                             f"{sorted(MODEL_TYPES)})")
        expert_keys = MODEL_TYPES[model_type]
        window = raw.get("sliding_window")
        if window is not None and window < raw["max_position_embeddings"]:
            raise ValueError(f"{model_dir}: sliding_window {window} is not supported (attention is global)")
        generation_path = model_dir / "generation_config.json"
        generation = json.loads(generation_path.read_text()) if generation_path.exists() else {}
        eos = generation.get("eos_token_id", raw.get("eos_token_id"))
        eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
        num_heads = raw["num_attention_heads"]
        return cls(
            vocab_size=raw["vocab_size"],
            hidden_size=raw["hidden_size"],
            intermediate_size=raw["intermediate_size"],
            num_layers=raw["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=raw.get("num_key_value_heads", num_heads),
            head_dim=raw.get("head_dim") or raw["hidden_size"] // num_heads,
            rms_norm_eps=raw["rms_norm_eps"],
            rope_theta=_rope_theta(model_dir, raw),
            max_position_embeddings=raw["max_position_embeddings"],
            tie_word_embeddings=raw.get("tie_word_embeddings", False),
            eos_token_ids=eos_ids,
            num_experts=raw[expert_keys[0]] if expert_keys else 0,
            num_experts_per_tok=raw[expert_keys[1]] if expert_keys else 0,
        )


def _rope_theta(model_dir: Path, raw: dict) -> float:
    """Plain rotary embeddings only. transformers 5 writes `rope_parameters` ({"rope_type", "rope_theta"});
    older checkpoints write `rope_theta` and, for scaled variants, `rope_scaling`."""
    if raw.get("rope_scaling"):
        raise ValueError(f"{model_dir}: rope_scaling {raw['rope_scaling']!r} is not supported yet")
    params = raw.get("rope_parameters") or {}
    if params.get("rope_type", "default") != "default":
        raise ValueError(f"{model_dir}: rope_parameters {params!r} are not supported yet (plain rotary only)")
    return float(params.get("rope_theta") or raw.get("rope_theta") or 10000.0)
