"""Fidelity of weight formats against the fp32 reference on the same prompts.

For every configuration: perplexity on the perplexity suites and its change from fp32, top-1 agreement and
mean KL(fp32 || config) of the next-token distributions at every position of those texts, and accuracy on
each task suite. Results as JSON and a table; the gate exits non-zero when a configuration regresses past
--max-ppl-increase, --min-agreement or a --min-accuracy floor.
"""

import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from common.config import resolve_threads
from common.eval.scoring import Scorer
from common.eval.suites import Suite, load_suites
from common.machine import describe_machine, machine_facts
from common.model.weights import load_model, stored_weight_bytes
from common.tokenizer import TextTokenizer

REFERENCE = "fp32"
MAX_TOKENS = 4096  # KV slots of the scorer: the longest text, or one task suite's prompts plus completions


@dataclass
class ConfigResult:
    weights: str
    weight_bytes: int
    perplexity: float
    ppl_increase: float  # fraction: 0.05 is 5 % above fp32
    top1_agreement: float
    mean_kl: float
    accuracy: dict[str, float]
    seconds: float
    failures: list[str] = field(default_factory=list)


@dataclass
class Gate:
    max_ppl_increase: float | None = None
    min_agreement: float | None = None
    min_accuracy: dict[str, float] = field(default_factory=dict)

    def failures(self, result: ConfigResult) -> list[str]:
        found = []
        if self.max_ppl_increase is not None and result.ppl_increase > self.max_ppl_increase:
            found.append(f"perplexity +{result.ppl_increase:.1%} > +{self.max_ppl_increase:.1%}")
        if self.min_agreement is not None and result.top1_agreement < self.min_agreement:
            found.append(f"top-1 agreement {result.top1_agreement:.1%} < {self.min_agreement:.1%}")
        for suite, floor in self.min_accuracy.items():
            if suite not in result.accuracy:
                found.append(f"no task suite named {suite!r} was run")
            elif result.accuracy[suite] < floor:
                found.append(f"{suite} accuracy {result.accuracy[suite]:.1%} < {floor:.1%}")
        return found


def perplexity_text_ids(scorer: Scorer, suites: list[Suite]) -> list[list[int]]:
    return [scorer.tokenizer.encode(t)[:MAX_TOKENS] for s in suites if s.is_perplexity for t in s.texts]


def _accuracy(scorer: Scorer, suite: Suite) -> float:
    prompts = [scorer.encode(item.prompt, item.chat) for item in suite.tasks]
    completions = scorer.greedy(prompts, [item.max_new_tokens for item in suite.tasks])
    correct = [item.is_correct(scorer.tokenizer.decode(ids)) for item, ids in zip(suite.tasks, completions)]
    return sum(correct) / len(correct)


def score_texts(scorer: Scorer, texts: list[list[int]],
                reference: list[torch.Tensor]) -> tuple[float, int, int, float]:
    """Negative log-likelihood and predicted-token count over texts, and against the reference's
    log-probabilities: top-1 agreements and summed KL(reference || scorer). With `reference` empty, the
    scorer is the reference: its log-probabilities are appended to it and agreement and KL stay 0."""
    is_reference = not reference
    nll, count, agree, kl = 0.0, 0, 0, 0.0
    for index, ids in enumerate(texts):
        log_probs = scorer.log_probs(ids)  # (len - 1, vocab)
        targets = torch.tensor(ids[1:])
        nll -= log_probs.gather(1, targets[:, None]).sum().item()
        count += len(targets)
        if is_reference:
            reference.append(log_probs)
            continue
        ref = reference[index]
        agree += (log_probs.argmax(-1) == ref.argmax(-1)).sum().item()
        kl += (ref.exp() * (ref - log_probs)).sum().item()
    return nll, count, agree, kl


def evaluate(model_dir: Path, formats: list[str], suites: list[Suite], gate: Gate) -> list[ConfigResult]:
    """The reference first, then each format; every format's distributions are compared position by position."""
    tokenizer = TextTokenizer(model_dir)
    reference_log_probs: list[torch.Tensor] = []
    reference_nll = 0.0
    results = []
    for fmt in [REFERENCE, *[f for f in formats if f != REFERENCE]]:
        start = time.monotonic()
        model = load_model(model_dir, fmt)
        scorer = Scorer(model, tokenizer, MAX_TOKENS)
        nll, count, agree, kl = score_texts(scorer, perplexity_text_ids(scorer, suites), reference_log_probs)
        if fmt == REFERENCE:
            reference_nll = nll
        perplexity = math.exp(nll / count) if count else float("nan")
        result = ConfigResult(
            weights=fmt, weight_bytes=stored_weight_bytes(model)["total"], perplexity=perplexity,
            ppl_increase=math.exp((nll - reference_nll) / count) - 1 if count else 0.0,
            top1_agreement=agree / count if fmt != REFERENCE and count else 1.0,
            mean_kl=kl / count if count else 0.0,
            accuracy={s.name: _accuracy(scorer, s) for s in suites if not s.is_perplexity},
            seconds=time.monotonic() - start)
        if fmt != REFERENCE:
            result.failures = gate.failures(result)
        results.append(result)
        print(f"pdserve eval: {fmt} done in {result.seconds:.0f} s", file=sys.stderr, flush=True)
        del model, scorer
    return results


def table(results: list[ConfigResult]) -> str:
    task_names = list(results[0].accuracy) if results else []
    reference_bytes = results[0].weight_bytes if results else 1
    head = ["weights", "MiB", "% fp32", "ppl", "Δppl", "top-1 agree", "mean KL", *task_names, "gate"]
    rows = []
    for r in results:
        gate = "ref" if r.weights == REFERENCE else ("FAIL: " + "; ".join(r.failures) if r.failures else "pass")
        rows.append([r.weights, f"{r.weight_bytes / 2**20:.1f}", f"{r.weight_bytes / reference_bytes:.1%}",
                     f"{r.perplexity:.3f}", f"{r.ppl_increase:+.2%}", f"{r.top1_agreement:.1%}", f"{r.mean_kl:.4f}",
                     *[f"{r.accuracy[name]:.0%}" for name in task_names], gate])
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def run_from_args(args) -> int:
    torch.set_num_threads(resolve_threads(args.threads))
    suites = load_suites(args.suites, args.only)
    gate = Gate(args.max_ppl_increase, args.min_agreement, dict(args.min_accuracy))
    results = evaluate(args.model, args.weights or ["int8"], suites, gate)
    # Kernels, and so summation orders and the figures' last digits, differ between CPUs.
    print(f"Machine: {describe_machine()}\n")
    print(table(results))
    if args.json:
        args.json.write_text(json.dumps({"model": str(args.model), "machine_facts": machine_facts(),
                                         "suites": [s.name for s in suites],
                                         "results": [asdict(r) for r in results]}, indent=2) + "\n")
    failed = [r.weights for r in results if r.failures]
    if failed:
        print(f"pdserve eval: gate failed for {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0
