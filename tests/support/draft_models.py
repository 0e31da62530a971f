"""Draft models for the speculation tests, made in seconds from the target itself (no training)."""

from pathlib import Path

import torch

from common.basics.model_config import ModelConfig
from common.model.draft_head import HEAD_FILE
from common.model.weights import load_dense
from pdserve.distill.student import StudentLlama


def truncated_draft(model_dir: Path, out_dir: Path, num_layers: int = 2, head_tokens: int | None = 4096) -> Path:
    """The target's first num_layers layers with its embedding, final norm and tokenizer, saved as a Hugging
    Face checkpoint: a weak but real draft. head_tokens: its head covers token ids [0, head_tokens) and the
    EOS ids (draft_head.json); None: the whole vocabulary (no head file)."""
    config = ModelConfig.from_dir(model_dir)
    head = sorted(set(range(head_tokens or config.vocab_size)) | set(config.eos_token_ids))
    student = StudentLlama.from_target(load_dense(model_dir), config, list(range(num_layers)), torch.tensor(head))
    student.save(out_dir, model_dir, {"test": "truncated"})
    if head_tokens is None:
        (out_dir / HEAD_FILE).unlink()
    return out_dir
