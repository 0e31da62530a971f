"""`pdserve eval` and `pdserve quantize` flags (torch-free: the CLI builds its parser before torch loads)."""

import argparse
from pathlib import Path

from common.basics.config import KV_DTYPES, WEIGHT_FORMAT_NAMES
from common.fidelity.suites import DEFAULT_SUITES_DIR
from pdserve.command import Command


def _floor(text: str) -> tuple[str, float]:
    suite, _, value = text.partition("=")
    try:
        return suite, float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected SUITE=ACCURACY (e.g. arithmetic=0.5), got {text!r}") from None


def add_eval_arguments(evaluate: argparse.ArgumentParser, model_dir: Path) -> None:
    evaluate.add_argument("--model", type=Path, default=model_dir)
    evaluate.add_argument("--weights", action="append", choices=WEIGHT_FORMAT_NAMES, metavar="FORMAT",
                          help=f"a configuration to evaluate (repeatable; default int8): {', '.join(WEIGHT_FORMAT_NAMES)}")
    evaluate.add_argument("--kv-dtype", action="append", choices=KV_DTYPES, metavar="DTYPE",
                          help="a KV cache dtype to evaluate (repeatable; default float32): "
                               f"{', '.join(KV_DTYPES)}. Every --weights format runs with every --kv-dtype; the "
                               "reference is always fp32 weights with a float32 KV cache, and each pair is "
                               "compared with it (--weights fp32 --kv-dtype int8: the KV cache's cost alone)")
    evaluate.add_argument("--suites", type=Path, default=DEFAULT_SUITES_DIR,
                          help="directory of *.jsonl suites (its subdirectories too: generated/)")
    evaluate.add_argument("--only", action="append", metavar="SUITE", help="run only these suites (repeatable)")
    evaluate.add_argument("--max-items", type=int, metavar="N",
                          help="score only the first N items of each task suite (a quicker, wider-interval run)")
    evaluate.add_argument("--json", type=Path, help="also write the full results here")
    evaluate.add_argument("--max-ppl-increase", type=float, metavar="FRACTION",
                          help="gate: fail when perplexity grows by more than this fraction (0.05 = 5%%)")
    evaluate.add_argument("--min-agreement", type=float, metavar="FRACTION",
                          help="gate: fail when top-1 agreement with fp32 is below this")
    evaluate.add_argument("--min-accuracy", action="append", type=_floor, default=[], metavar="SUITE=ACCURACY",
                          help="gate: fail when a task suite's accuracy is below this floor (repeatable)")
    evaluate.add_argument("--max-accuracy-drop", type=float, metavar="FRACTION",
                          help="gate: fail when, on any task suite, the whole 95%% interval of (accuracy - the "
                               "reference's accuracy) over the same items lies below -FRACTION (0: any "
                               "statistically significant drop fails; 0.02: a drop surely beyond 2 points)")
    evaluate.add_argument("--cpu-weight-layout", choices=("single", "dual"), default="single",
                          help="dual: every format through the CPU copies a tier adds where they measure faster "
                               "(oneDNN fp32 / bf16, FBGEMM fp16), as served on this CPU; single: the plain path")
    evaluate.add_argument("--long-context", action="store_true",
                          help="also perplexity, top-1 agreement and KL at 2k, 4k and 8k tokens of context, and "
                               "needle retrieval from prompts of those lengths (about 5 minutes per configuration "
                               "on two CPU cores)")
    evaluate.add_argument("--threads", type=int, default=0, help="torch threads (0: every core this process may use)")


def add_quantize_arguments(quantize: argparse.ArgumentParser, model_dir: Path) -> None:
    quantize.add_argument("--model", type=Path, default=model_dir)
    quantize.add_argument("--weights", required=True, choices=WEIGHT_FORMAT_NAMES, metavar="FORMAT")


def run_eval(args, _default_model: Path) -> int:
    from pdserve.eval.run import run_from_args

    return run_from_args(args)


def run_quantize(args, _default_model: Path) -> int:
    from common.model.linear import weight_format
    from common.model.weights import checkpoint_path, load_model, stored_weight_bytes

    fmt = weight_format(args.weights)  # aliases (int4, int4-awq) resolve to a named group size
    sizes = stored_weight_bytes(load_model(args.model, fmt.name))
    where = checkpoint_path(args.model, fmt.name)
    saved = f", saved at {where}" if fmt.saved and where.exists() else " (a cast of the source weights; nothing to save)"
    print(f"{fmt.name}: {sizes['total'] / 2**20:.1f} MiB of weights{saved}")
    return 0


EVAL = Command("eval", "fidelity of weight formats against the fp32 reference (perplexity, top-1 agreement, KL, "
                       "task accuracy), with a regression gate", add_eval_arguments, run_eval)
QUANTIZE = Command("quantize", "quantise the model once into a tier's weight format and save it (tiers otherwise "
                               "do this at their first start)", add_quantize_arguments, run_quantize)
