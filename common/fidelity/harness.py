"""Fidelity of weight formats and KV cache dtypes against the reference (fp32 weights, float32 KV) on the
same prompts.

A configuration is a (weights, KV dtype) pair. For every configuration: perplexity on the perplexity suites and
its change from the reference, top-1 agreement and mean KL(reference || config) of the next-token distributions
at every position of those texts, all through a KV pool of the configuration's dtype, and on each task suite
the right/wrong outcome of every item, the accuracy with its 95 % interval and the paired difference from the
reference over the same items (common/fidelity/stats.py). Results as JSON and a table; the gate exits non-zero
when a configuration regresses past --max-ppl-increase, --min-agreement, a --min-accuracy floor or
--max-accuracy-drop.
"""

import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from common.basics.tokenizer import TextTokenizer
from common.fidelity.long_context import LongContext, LongContextResult
from common.fidelity.scoring import Scorer
from common.fidelity.stats import PairedDifference, Proportion, accuracy, paired_difference
from common.fidelity.suites import Suite
from common.model.weights import load_model, stored_weight_bytes

REFERENCE = "fp32"
REFERENCE_KV = "float32"
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
    kv_dtype: str = REFERENCE_KV
    outcomes: dict[str, list[bool]] = field(default_factory=dict)  # suite -> right/wrong per item, in order
    accuracy_interval: dict[str, Proportion] = field(default_factory=dict)
    difference: dict[str, PairedDifference] = field(default_factory=dict)  # config - reference, same items
    suite_seconds: dict[str, float] = field(default_factory=dict)
    long_context: LongContextResult | None = None  # with --long-context

    @property
    def is_reference(self) -> bool:
        return (self.weights, self.kv_dtype) == (REFERENCE, REFERENCE_KV)

    @property
    def name(self) -> str:
        return self.weights if self.kv_dtype == REFERENCE_KV else f"{self.weights} / kv {self.kv_dtype}"


@dataclass
class Gate:
    max_ppl_increase: float | None = None
    min_agreement: float | None = None
    min_accuracy: dict[str, float] = field(default_factory=dict)
    max_accuracy_drop: float | None = None  # fraction: fail when the whole 95 % interval lies below -this

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
        if self.max_accuracy_drop is not None:
            found += self._drops(result)
        return found

    def _drops(self, result: ConfigResult) -> list[str]:
        if not result.difference:
            return ["no task suite was run, so accuracy drops cannot be gated: run a task suite too"]
        return [f"{suite} accuracy {d.estimate * 100:+.1f} points against the reference (95% interval "
                f"{d.low * 100:+.1f} to {d.high * 100:+.1f}: {d.num_lost} items lost, {d.num_gained} gained), "
                f"beyond the {self.max_accuracy_drop * 100:.1f} points allowed"
                for suite, d in result.difference.items() if d.high < -self.max_accuracy_drop]


def perplexity_text_ids(scorer: Scorer, suites: list[Suite]) -> list[list[int]]:
    return [scorer.tokenizer.encode(t)[:MAX_TOKENS] for s in suites if s.is_perplexity for t in s.texts]


def outcomes(scorer: Scorer, suite: Suite) -> list[bool]:
    """Whether each task item's greedy completion is right, in the suite's order."""
    prompts = [scorer.encode(item.prompt, item.chat) for item in suite.tasks]
    completions = scorer.greedy(prompts, [item.max_new_tokens for item in suite.tasks])
    return [item.is_correct(scorer.tokenizer.decode(ids)) for item, ids in zip(suite.tasks, completions)]


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


def configurations(formats: list[str], kv_dtypes: list[str]) -> list[tuple[str, str]]:
    """(weights, KV dtype) pairs: the reference first, then every format with every KV dtype, each pair once and
    grouped by format so that each model loads once."""
    pairs = [(REFERENCE, REFERENCE_KV)]
    for fmt in sorted(dict.fromkeys(formats), key=lambda f: f != REFERENCE):  # fp32 first: the reference loaded it
        pairs += [(fmt, kv) for kv in dict.fromkeys(kv_dtypes) if (fmt, kv) not in pairs]
    return pairs


def _task_results(scorer: Scorer, suites: list[Suite], result: ConfigResult, reference: ConfigResult | None) -> None:
    for suite in suites:
        if suite.is_perplexity:
            continue
        start = time.monotonic()
        right = outcomes(scorer, suite)
        result.suite_seconds[suite.name] = time.monotonic() - start
        result.outcomes[suite.name] = right
        result.accuracy_interval[suite.name] = accuracy(right)
        result.accuracy[suite.name] = result.accuracy_interval[suite.name].estimate
        if reference is not None:
            result.difference[suite.name] = paired_difference(right, reference.outcomes[suite.name])


def evaluate(model_dir: Path, formats: list[str], suites: list[Suite], gate: Gate, cpu_copies: bool = False,
             kv_dtypes: list[str] | None = None, long_context: bool = False) -> list[ConfigResult]:
    """The reference first, then every (format, KV dtype) pair (`configurations`); every pair's distributions are
    compared position by position, its task outcomes item by item. cpu_copies: every model gets the CPU copies a
    tier adds with --cpu-weight-layout dual (the oneDNN / FBGEMM products), so the figures are those of the path
    served on this CPU. long_context: also the long-context measures (common/fidelity/long_context.py)."""
    tokenizer = TextTokenizer(model_dir)
    long_texts = LongContext(model_dir) if long_context else None
    reference_log_probs: list[torch.Tensor] = []
    reference_nll = 0.0
    results: list[ConfigResult] = []
    model, loaded = None, None
    for fmt, kv_dtype in configurations(formats, kv_dtypes or [REFERENCE_KV]):
        start = time.monotonic()
        if fmt != loaded:
            del model
            model, loaded = load_model(model_dir, fmt), fmt
            if cpu_copies:
                model.add_blocked_copies()
        scorer = Scorer(model, tokenizer, MAX_TOKENS, kv_dtype)
        nll, count, agree, kl = score_texts(scorer, perplexity_text_ids(scorer, suites), reference_log_probs)
        is_reference = not results
        if is_reference:
            reference_nll = nll
        result = ConfigResult(
            weights=fmt, kv_dtype=kv_dtype, weight_bytes=stored_weight_bytes(model)["total"],
            perplexity=math.exp(nll / count) if count else float("nan"),
            # No perplexity text scored (e.g. --only a task suite): nothing measured, so NaN, never a perfect score.
            ppl_increase=math.exp((nll - reference_nll) / count) - 1 if count else float("nan"),
            top1_agreement=(1.0 if is_reference else agree / count) if count else float("nan"),
            mean_kl=kl / count if count else float("nan"), accuracy={}, seconds=0.0)
        _task_results(scorer, suites, result, None if is_reference else results[0])
        if long_texts is not None:
            result.long_context = long_texts.evaluate(model, kv_dtype)
        result.seconds = time.monotonic() - start
        if not is_reference:
            result.failures = gate.failures(result)
        results.append(result)
        print(f"pdserve eval: {result.name} done in {result.seconds:.0f} s", file=sys.stderr, flush=True)
        del scorer
    return results
