"""A tiny random Mixtral checkpoint written by Hugging Face transformers itself (save_pretrained), for the
model and integration tests, and the reference's routing: which experts each token went to."""

import shutil
from pathlib import Path

import torch

TINY_MIXTRAL = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=256,
                    rms_norm_eps=1e-5)


def build_tiny_mixtral(model_dir: Path, vocab_size: int, *, tokenizer_from: Path | None = None, seed: int = 0):
    """Saves a random MixtralForCausalLM (safetensors, config.json) to model_dir and returns it (eval mode).
    Weights are drawn wider than transformers' init so routers separate their top-k choices clearly (no
    near-ties that rounding could flip). tokenizer_from: a directory whose tokenizer files are copied."""
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(seed)
    model = MixtralForCausalLM(MixtralConfig(vocab_size=vocab_size, **TINY_MIXTRAL)).eval()
    for name, param in model.named_parameters():
        if param.dim() == 1:  # norms
            param.data.normal_(1.0, 0.1)
        else:
            param.data.normal_(0, 0.5 if name.endswith("mlp.gate.weight") else 0.1)
    model.save_pretrained(model_dir)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        if tokenizer_from is not None:
            shutil.copy(tokenizer_from / name, model_dir / name)
    return model


def hf_expert_counts(model, token_ids: list[int], positions: slice) -> list[list[int]]:
    """(layers, experts) tokens routed to each expert by the reference, over the given positions of token_ids:
    top-k of the softmax of each layer's router logits, as Mixtral routes."""
    with torch.no_grad():
        router_logits = model(torch.tensor([token_ids]), output_router_logits=True).router_logits
    top_k, num_experts = model.config.num_experts_per_tok, model.config.num_local_experts
    counts = []
    for logits in router_logits:  # (tokens, experts) per layer
        chosen = torch.softmax(logits[positions].float(), dim=-1).topk(top_k, dim=-1).indices
        counts.append(torch.bincount(chosen.flatten(), minlength=num_experts).tolist())
    return counts
