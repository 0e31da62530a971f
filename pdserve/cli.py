"""The `pdserve` command: a registry of subcommands, each declared where it lives (pdserve/command.py).

    pdserve up | gateway | prefill | decode | colocated      serve (pdserve/launcher.py, pdserve/tier_commands.py)
    pdserve generate                                          a client (pdserve/generate.py over pdserve/client.py)
    pdserve certs | keys                                      mutual-TLS certificates, gateway API keys
    pdserve bench | plan | eval | quantize | trilemma | distill-draft | prepare-model | trace-report   the tools

Nothing heavy loads before a command runs: the process is set up first (OpenMP's wait policy is read when
torch loads)."""

import argparse
import logging
import os
import sys
from pathlib import Path

from common.basics.config import default_model_dir
from pdserve import certs, generate, keys, launcher, tier_commands
from pdserve.bench.cli import COMMAND as BENCH
from pdserve.command import Command
from pdserve.distill.cli import COMMAND as DISTILL
from pdserve.eval.cli import EVAL, QUANTIZE
from pdserve.plan.cli import COMMAND as PLAN
from pdserve.prepare.cli import COMMAND as PREPARE
from pdserve.trace_report.cli import COMMAND as TRACE_REPORT
from pdserve.trilemma.cli import COMMAND as TRILEMMA

COMMANDS: dict[str, Command] = {c.name: c for c in (
    launcher.UP, tier_commands.GATEWAY, tier_commands.PREFILL, tier_commands.DECODE, tier_commands.COLOCATED,
    generate.GENERATE, certs.COMMAND, keys.COMMAND, BENCH, EVAL, QUANTIZE, TRILEMMA, DISTILL, PREPARE, TRACE_REPORT,
    PLAN,
)}


def build_parser(model_dir: Path) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pdserve", description="Disaggregated prefill/decode LLM serving over gRPC.")
    sub = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS.values():
        command.add_arguments(sub.add_parser(command.name, help=command.help), model_dir)
    return parser


def main(argv: list[str] | None = None) -> int:
    # OpenMP threads spinning while idle steal the cores other tiers and clients need (a batch-1 step went from 70 ms
    # to 1.7 s beside one competing process). Read once when torch loads: set before any import; explicit wins.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    model_dir = default_model_dir(os.environ.get("XDG_CACHE_HOME"), os.path.expanduser("~"))
    args = build_parser(model_dir).parse_args(argv)
    try:
        return COMMANDS[args.command].run(args, model_dir)
    except (ValueError, FileNotFoundError, OSError) as error:
        print(f"pdserve {args.command}: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
