"""`pdserve trilemma` flags (torch-free) and the command that runs the sweep and writes the report."""

import argparse
import sys
from pathlib import Path

from pdserve.affinity import cpus_arg
from pdserve.command import Command


def _config(text: str):
    from pdserve.trilemma.sweep import ServeConfig

    try:
        return ServeConfig.parse(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def add_trilemma_arguments(trilemma: argparse.ArgumentParser, model_dir: Path) -> None:
    trilemma.add_argument("--model", type=Path, default=model_dir)
    trilemma.add_argument("--config", dest="configs", action="append", type=_config, metavar="SPEC",
                          help="a configuration, e.g. prefill=fp32,decode=int4-awq-g128,kv=int8,spec=prompt-lookup "
                               "(repeatable; omitted keys: fp32 weights, float32 KV, no speculation; default: a "
                               "built-in sweep). The all-fp32 reference always runs first.")
    trilemma.add_argument("--workload", default="chat", help="bench workload of the load (pdserve bench --help)")
    trilemma.add_argument("--num-requests", type=int, default=16)
    trilemma.add_argument("--concurrency", type=int, default=4, help="closed-loop clients")
    trilemma.add_argument("--fidelity-prompts", type=int, default=8, help="greedy chat prompts compared with fp32")
    trilemma.add_argument("--fidelity-tokens", type=int, default=48, help="tokens of each greedy answer")
    trilemma.add_argument("--no-teacher-forced", dest="teacher_forced", action="store_false",
                          help="skip the teacher-forced agreement / KL / perplexity measures")
    trilemma.add_argument("--fixed-k", action="store_true",
                          help="speculating configurations always propose --num-speculative-tokens (no adaptive "
                               "k): how much they speculate no longer depends on this machine's measured costs")
    trilemma.add_argument("--max-duration-s", type=float, default=300.0, help="hard cap of each load run")
    trilemma.add_argument("--prefill-cpus", type=cpus_arg, metavar="LIST")
    trilemma.add_argument("--decode-cpus", type=cpus_arg, metavar="LIST")
    trilemma.add_argument("--out", type=Path, default=Path("trilemma-results"))


def run_trilemma(args, default_model: Path) -> int:
    from pdserve.trilemma.run import execute

    if args.num_requests < 1 or args.concurrency < 1 or args.fidelity_prompts < 1:
        print("pdserve trilemma: --num-requests, --concurrency and --fidelity-prompts must be >= 1", file=sys.stderr)
        return 2
    if args.model == default_model:
        from pdserve.prepare.default_model import prepare_default_model

        prepare_default_model(default_model)
    args.command_line = " ".join(["pdserve", *sys.argv[1:]]) if sys.argv[1:2] == ["trilemma"] else "pdserve trilemma"
    rows = execute(args)["rows"]
    return 0 if rows and not any(r.get("error") for r in rows) else 1


COMMAND = Command("trilemma", "sweep serving configurations: latency, cost and fidelity, with the Pareto front marked",
                  add_trilemma_arguments, run_trilemma)
