"""`pdserve distill-draft` flags. Kept light: torch loads only when the command runs."""

import argparse
import os
from pathlib import Path

from pdserve.command import Command


def default_draft_dir(model_dir: Path) -> Path:
    """Where a model's distilled draft goes by default: beside it, outside git."""
    return model_dir.parent / f"{model_dir.name}-draft"


def add_distill_arguments(parser: argparse.ArgumentParser, model_dir: Path) -> None:
    parser.add_argument("--model", type=Path, default=model_dir, help="the target model (default: the default model)")
    parser.add_argument("--out", type=Path,
                        help=f"output checkpoint directory (default {default_draft_dir(model_dir)})")
    parser.add_argument("--minutes", type=float, default=45.0, help="wall-clock budget of the whole run")
    parser.add_argument("--layers", type=int, default=2, help="draft layers (copied from evenly spaced target layers)")
    parser.add_argument("--head-tokens", type=int, default=8192, help="tokens the draft's LM head covers")
    parser.add_argument("--generate-share", type=float, default=0.45,
                        help="share of the budget the target spends writing training text")
    parser.add_argument("--batch-size", type=int, default=24, help="answers the target writes at once")
    parser.add_argument("--max-new-tokens", type=int, default=192, help="longest answer the target writes")
    parser.add_argument("--max-answers", type=int, help="stop writing after this many answers (default: the budget)")
    parser.add_argument("--max-steps", type=int, help="stop training after this many steps (default: the budget)")
    parser.add_argument("--batch-tokens", type=int, default=2048, help="padded tokens per training step")
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: every core this process may use)")
    parser.add_argument("--reuse-corpus", action="store_true",
                        help="train on OUT/distill/corpus.pt from an earlier run instead of writing new text")


def run_distill(args, default_model: Path) -> int:
    import torch

    from pdserve.distill.distill import DistillConfig, distill

    if args.model == default_model:
        from pdserve.prepare.default_model import prepare_default_model

        prepare_default_model(default_model)
    torch.set_num_threads(args.threads or len(os.sched_getaffinity(0)))
    distill(DistillConfig(target_dir=args.model, out_dir=args.out or default_draft_dir(args.model),
                          minutes=args.minutes, layers=args.layers, head_tokens=args.head_tokens,
                          generate_share=args.generate_share, batch_size=args.batch_size,
                          max_new_tokens=args.max_new_tokens, batch_tokens=args.batch_tokens, lr=args.lr,
                          seed=args.seed, max_answers=args.max_answers, max_steps=args.max_steps,
                          reuse_corpus=args.reuse_corpus))
    return 0


COMMAND = Command("distill-draft", "train a small draft model for --speculative draft", add_distill_arguments,
                  run_distill)
