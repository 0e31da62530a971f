"""Fidelity of weight formats against the fp32 reference on the same prompts.

For every configuration: perplexity on the perplexity suites and its change from fp32, top-1 agreement and
mean KL(fp32 || config) of the next-token distributions at every position of those texts, and accuracy on
each task suite. Results as JSON and a table; the gate exits non-zero when a configuration regresses past
--max-ppl-increase, --min-agreement or a --min-accuracy floor.
"""

import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from common.basics.tokenizer import TextTokenizer
from common.fidelity.scoring import Scorer
from common.fidelity.suites import Suite
from common.model.weights import load_model, stored_weight_bytes

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
        if (self.max_ppl_increase is not None or self.min_agreement is not None) and math.isnan(result.ppl_increase):
            found.append("no perplexity text was scored, so perplexity and agreement cannot be gated: run the "
                         "perplexity suites too")
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


def evaluate(model_dir: Path, formats: list[str], suites: list[Suite], gate: Gate,
             cpu_copies: bool = False) -> list[ConfigResult]:
    """The reference first, then each format; every format's distributions are compared position by position.
    cpu_copies: every model gets the CPU copies a tier adds with --cpu-weight-layout dual (the oneDNN / FBGEMM
    products), so the figures are those of the path served on this CPU."""
    tokenizer = TextTokenizer(model_dir)
    reference_log_probs: list[torch.Tensor] = []
    reference_nll = 0.0
    results = []
    for fmt in [REFERENCE, *[f for f in formats if f != REFERENCE]]:
        start = time.monotonic()
        model = load_model(model_dir, fmt)
        if cpu_copies:
            model.add_blocked_copies()
        scorer = Scorer(model, tokenizer, MAX_TOKENS)
        nll, count, agree, kl = score_texts(scorer, perplexity_text_ids(scorer, suites), reference_log_probs)
        if fmt == REFERENCE:
            reference_nll = nll
        perplexity = math.exp(nll / count) if count else float("nan")
        result = ConfigResult(
            weights=fmt, weight_bytes=stored_weight_bytes(model)["total"], perplexity=perplexity,
            # No perplexity text scored (e.g. --only a task suite): nothing measured, so NaN, never a perfect score.
            ppl_increase=math.exp((nll - reference_nll) / count) - 1 if count else float("nan"),
            top1_agreement=(agree / count if fmt != REFERENCE else 1.0) if count else float("nan"),
            mean_kl=kl / count if count else float("nan"),
            accuracy={s.name: _accuracy(scorer, s) for s in suites if not s.is_perplexity},
            seconds=time.monotonic() - start)
        if fmt != REFERENCE:
            result.failures = gate.failures(result)
        results.append(result)
        print(f"pdserve eval: {fmt} done in {result.seconds:.0f} s", file=sys.stderr, flush=True)
        del model, scorer
    return results
