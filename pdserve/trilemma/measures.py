"""What the trilemma measures offline, once per weight format or (weights, KV dtype) pair: bytes of weights
as stored, KV bytes per token, and teacher-forced fidelity against fp32 weights with a float32 KV cache on
the fidelity harness's perplexity texts."""

import math
from pathlib import Path

import torch

from common.basics.tokenizer import TextTokenizer
from common.fidelity.harness import MAX_TOKENS, perplexity_text_ids, score_texts
from common.fidelity.scoring import Scorer
from common.fidelity.suites import DEFAULT_SUITES_DIR, load_suites
from common.model.weights import load_model, stored_weight_bytes
from pdserve.bench.runner import kv_bytes_per_token_of

REFERENCE_PAIR = ("fp32", "float32")


def weight_bytes(model_dir: Path, formats: set[str]) -> dict[str, int]:
    out = {}
    for fmt in sorted(formats):
        model = load_model(model_dir, fmt)
        out[fmt] = stored_weight_bytes(model)["total"]
        del model
    return out


def kv_bytes(model_dir: Path, kv_dtypes: set[str]) -> dict[str, int]:
    """K and V of one token in every layer, scales included."""
    from common.basics.model_config import ModelConfig

    c = ModelConfig.from_dir(model_dir)
    return {d: kv_bytes_per_token_of(d, c.num_layers, c.num_kv_heads, c.head_dim) for d in sorted(kv_dtypes)}


def teacher_forced(model_dir: Path, pairs: set[tuple[str, str]]) -> dict[tuple[str, str], dict]:
    """For each (weights, kv_dtype): top-1 agreement, mean KL(reference || pair) and perplexity change at
    every position of the perplexity texts, the reference being ("fp32", "float32")."""
    tokenizer = TextTokenizer(model_dir)
    suites = [s for s in load_suites(DEFAULT_SUITES_DIR) if s.is_perplexity]
    reference: list[torch.Tensor] = []
    reference_nll, out = 0.0, {}
    for weights, kv_dtype in [REFERENCE_PAIR, *sorted(pairs - {REFERENCE_PAIR})]:
        model = load_model(model_dir, weights)
        scorer = Scorer(model, tokenizer, MAX_TOKENS, kv_dtype=kv_dtype)
        nll, count, agree, kl = score_texts(scorer, perplexity_text_ids(scorer, suites), reference)
        if not out:
            reference_nll = nll
        out[(weights, kv_dtype)] = {"top1_agreement": round(agree / count, 4) if out else 1.0,
                                    "mean_kl": round(kl / count, 5) if out else 0.0,
                                    "ppl_increase": round(math.exp((nll - reference_nll) / count) - 1, 5)}
        del model, scorer
    return out
