"""`pdserve eval`: scores (weights, KV dtype) configurations against the reference (common/fidelity/harness.py),
prints the table, writes --json, and exits non-zero when the gate fails."""

import json
import math
import sys
from dataclasses import asdict

import torch

from common.basics.config import resolve_threads
from common.fidelity.harness import ConfigResult, Gate, evaluate
from common.fidelity.stats import Proportion
from common.fidelity.suites import load_suites
from common.runtime.machine import describe_machine, machine_facts


def _shown(value: float, spec: str) -> str:
    """A figure, or "-" where nothing was measured (NaN)."""
    return "-" if math.isnan(value) else format(value, spec)


def _accuracy_shown(proportion: Proportion) -> str:
    """62% ±4: the accuracy and the larger side of its 95 % interval, in points."""
    half = max(proportion.estimate - proportion.low, proportion.high - proportion.estimate)
    return f"{proportion.estimate:.0%} ±{half * 100:.0f}"


def table(results: list[ConfigResult]) -> str:
    task_names = list(results[0].accuracy) if results else []
    reference_bytes = results[0].weight_bytes if results else 1
    head = ["weights", "kv", "MiB", "% fp32", "ppl", "Δppl", "top-1 agree", "mean KL", *task_names, "gate"]
    rows = []
    for r in results:
        gate = "ref" if r.is_reference else ("FAIL: " + "; ".join(r.failures) if r.failures else "pass")
        rows.append([r.weights, r.kv_dtype, f"{r.weight_bytes / 2**20:.1f}", f"{r.weight_bytes / reference_bytes:.1%}",
                     _shown(r.perplexity, ".3f"), _shown(r.ppl_increase, "+.2%"), _shown(r.top1_agreement, ".1%"),
                     _shown(r.mean_kl, ".4f"),
                     *[_accuracy_shown(r.accuracy_interval[name]) for name in task_names], gate])
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def long_context_table(results: list[ConfigResult]) -> str:
    marks = list(results[0].long_context.marks)
    head = ["weights", "kv"]
    for mark in marks:
        head += [f"Δppl @{mark // 1024}k", f"top-1 @{mark // 1024}k", f"KL @{mark // 1024}k"]
    head += [f"needles @{mark // 1024}k" for mark in marks]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r in results:
        row = [r.weights, r.kv_dtype]
        for mark in marks:
            m = r.long_context.marks[mark]
            row += [f"{m['ppl_increase']:+.2%}", f"{m['top1_agreement']:.1%}", f"{m['mean_kl']:.4f}"]
        for mark in marks:
            needles = [n for n in r.long_context.needles if n["length"] == mark]
            row.append(f"{sum(n['correct'] for n in needles)}/{len(needles)}, "
                       f"{sum(n['same_as_reference'] for n in needles)} same")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def run_from_args(args) -> int:
    torch.set_num_threads(resolve_threads(args.threads))
    suites = [s.head(getattr(args, "max_items", None)) for s in load_suites(args.suites, args.only)]
    gate = Gate(args.max_ppl_increase, args.min_agreement, dict(args.min_accuracy),
                getattr(args, "max_accuracy_drop", None))
    results = evaluate(args.model, args.weights or ["int8"], suites, gate,
                       cpu_copies=getattr(args, "cpu_weight_layout", "single") == "dual",
                       kv_dtypes=getattr(args, "kv_dtype", None), long_context=getattr(args, "long_context", False))
    # Kernels, and so summation orders and the figures' last digits, differ between CPUs.
    print(f"Machine: {describe_machine()}\n")
    print(table(results))
    if any(r.long_context for r in results):
        print("\nLong context (evals/long/python-docs.txt; needles found / asked, answers equal to the reference's):\n")
        print(long_context_table(results))
    if args.json:
        args.json.write_text(json.dumps({"model": str(args.model), "machine_facts": machine_facts(),
                                         "suites": [s.name for s in suites],
                                         "results": [asdict(r) for r in results]}, indent=2) + "\n")
    failed = [r.name for r in results if r.failures]
    if failed:
        print(f"pdserve eval: gate failed for {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0
