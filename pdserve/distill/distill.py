"""`pdserve distill-draft`: the whole run under one wall-clock budget.

  1. write    : the target answers prompts (pdserve/distill/corpus.py) for `generate_share` of the budget
  2. head     : the draft's head covers the `head_tokens` tokens the target wrote most (EOS always)
  3. init     : a student of `layers` layers, copied from evenly spaced target layers
  4. train    : distillation on the target's distributions until the budget is spent (pdserve/distill/train.py)
  5. save     : an HF-format checkpoint (+ draft_head.json), and distill/report.json beside it

Held-out answers (5%) measure the draft before and after training: `agreement` (its top token is the
target's) is what greedy speculation accepts per proposed token, before the chain effect of k drafts.
"""

import json
import random
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from common.basics.model_config import ModelConfig
from common.model.weights import load_dense
from common.runtime.machine import machine_facts
from pdserve.distill.corpus import Sample, TargetWriter
from pdserve.distill.prompts import PromptSource
from pdserve.distill.student import StudentLlama
from pdserve.distill.train import evaluate, make_batches, train

_SAVE_MARGIN_S = 20.0  # kept back from training for evaluation and saving (at most 10% of the budget)


@dataclass(frozen=True)
class DistillConfig:
    target_dir: Path
    out_dir: Path
    minutes: float = 45.0
    layers: int = 2
    head_tokens: int = 8192
    generate_share: float = 0.45
    batch_size: int = 24  # sequences the target writes at once
    max_new_tokens: int = 192
    top_k: int = 32  # teacher probabilities kept per token
    batch_tokens: int = 2048  # padded tokens per training step
    lr: float = 5e-4
    seed: int = 0
    max_answers: int | None = None  # stop writing after this many answers, even with time left
    max_steps: int | None = None  # stop training after this many steps, even with time left
    reuse_corpus: bool = False  # train on out_dir/distill/corpus.pt when it exists instead of writing anew

    def __post_init__(self) -> None:
        if self.minutes <= 0 or not 0 < self.generate_share < 1:
            raise ValueError("--minutes must be > 0 and --generate-share in (0, 1)")
        if self.layers < 1 or self.head_tokens < 16 or self.top_k < 1 or self.batch_tokens < 64:
            raise ValueError("--layers >= 1, --head-tokens >= 16, --top-k >= 1, --batch-tokens >= 64")


def log(message: str) -> None:
    print(f"distill-draft: {message}", file=sys.stderr, flush=True)


def head_token_ids(samples: list[Sample], count: int, always: tuple[int, ...], vocab_size: int) -> torch.Tensor:
    """The `count` tokens the target wrote most (weighing in the probability it gave each of its top-k),
    `always` included, topped up with the lowest ids (BPE's earliest merges, its most frequent); sorted."""
    counts: Counter[int] = Counter()
    for s in samples:
        counts.update(s.token_ids[s.num_prompt_tokens:])
        for ids, probs in zip(s.teacher_ids.tolist(), s.teacher_probs.tolist()):
            counts.update(dict(zip(ids, probs)))
    ranked = [*always, *(t for t, _ in counts.most_common()), *range(vocab_size)]
    return torch.tensor(sorted(list(dict.fromkeys(ranked))[:count]))


def _coverage(samples: list[Sample], head_ids: torch.Tensor) -> float:
    """Share of answer tokens the head can propose."""
    head = set(head_ids.tolist())
    answers = [t for s in samples for t in s.token_ids[s.num_prompt_tokens:]]
    return sum(t in head for t in answers) / max(len(answers), 1)


def _write_corpus(config: DistillConfig, deadline: float) -> list[Sample]:
    path = config.out_dir / "distill" / "corpus.pt"
    if config.reuse_corpus and path.exists():
        log(f"reusing {path}")
        return [Sample(**s) for s in torch.load(path)]
    writer = TargetWriter(config.target_dir, batch_size=config.batch_size, max_new_tokens=config.max_new_tokens,
                          top_k=config.top_k, seed=config.seed)
    counted = {"samples": 0, "tokens": 0}

    def progress(sample: Sample) -> None:
        counted["samples"] += 1
        counted["tokens"] += sample.num_answer_tokens
        if counted["samples"] % 25 == 0:
            log(f"target wrote {counted['samples']} answers, {counted['tokens']} tokens")

    samples = writer.write(PromptSource(config.seed), deadline, progress, config.max_answers)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save([asdict(s) for s in samples], path)
    return samples


def distill(config: DistillConfig) -> dict:
    """Runs the five stages within config.minutes; returns the report (also written to distill/report.json)."""
    started = time.monotonic()
    budget_s = config.minutes * 60
    samples = _write_corpus(config, started + budget_s * config.generate_share)
    generated_s = time.monotonic() - started
    target_config = ModelConfig.from_dir(config.target_dir)
    head_ids = head_token_ids(samples, config.head_tokens, target_config.eos_token_ids, target_config.vocab_size)
    rng = random.Random(config.seed)
    rng.shuffle(samples)
    num_held_out = max(1, len(samples) // 20)
    held_out, training = samples[:num_held_out], samples[num_held_out:] or samples
    layer_ids = torch.linspace(0, target_config.num_layers - 1, config.layers).round().long().tolist()
    student = StudentLlama.from_target(load_dense(config.target_dir), target_config, layer_ids, head_ids)
    eval_batches = make_batches(held_out, head_ids, config.batch_tokens, rng)
    before = evaluate(student, eval_batches)
    log(f"{len(samples)} answers ({sum(s.num_answer_tokens for s in samples)} tokens) in {generated_s:.0f} s; "
        f"draft from target layers {layer_ids}; held-out agreement before training {before.agreement:.3f}")
    history: list[dict] = []

    def on_log(entry: dict) -> None:
        history.append(entry)
        log(f"step {entry['step']} (epoch {entry['epoch']}, {entry['elapsed_s']} s): loss {entry['loss']}, "
            f"agreement {entry['agreement']}; held-out {entry['held_out_loss']}, {entry['held_out_agreement']}")

    totals = train(student, make_batches(training, head_ids, config.batch_tokens, rng),
                   started + budget_s - min(_SAVE_MARGIN_S, budget_s / 10), config.lr, rng, on_log, eval_batches,
                   max_steps=config.max_steps)
    after = evaluate(student, eval_batches)
    report = {
        "target": str(config.target_dir), "machine": machine_facts(),
        "config": {k: str(v) for k, v in asdict(config).items()},
        "source_layers": layer_ids, "head_tokens": len(head_ids),
        "head_coverage_of_answer_tokens": round(_coverage(samples, head_ids), 4),
        "corpus": {"answers": len(samples), "answer_tokens": sum(s.num_answer_tokens for s in samples),
                   "held_out_answers": len(held_out), "seconds": round(generated_s, 1)},
        "training": totals, "held_out_before": asdict(before), "held_out_after": asdict(after), "history": history,
    }
    student.save(config.out_dir, config.target_dir, {"distilled_from": config.target_dir.name,
                                                     "source_layers": layer_ids})
    report["total_seconds"] = round(time.monotonic() - started, 1)
    (config.out_dir / "distill").mkdir(parents=True, exist_ok=True)
    (config.out_dir / "distill" / "report.json").write_text(json.dumps(report, indent=2))
    log(f"held-out loss {before.loss:.3f} -> {after.loss:.3f}, agreement {before.agreement:.3f} -> "
        f"{after.agreement:.3f}; saved {config.out_dir} after {report['total_seconds']:.0f} s")
    return report
