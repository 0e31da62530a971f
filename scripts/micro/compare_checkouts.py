"""Decode step times of two checkouts of this repository, measured in turns: one child process per checkout
per round, old, new, old, new..., so that the machine's drift falls on both alike. Each child loads the
default model in fp32 and fp16 (with the CPU copies a tier serves with), one torch thread, and times steps
at a few batch sizes and contexts, and over four sequences of different lengths (median of 9).

    git worktree add /tmp/old <commit>
    .venv/bin/python scripts/micro/compare_checkouts.py /tmp/old [NEW_CHECKOUT] [--rounds 3]
"""
import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

STEPS = ((1, 128), (1, 1000), (8, 300), (16, 128), (8, 1000))  # (batch, context)
MIXED = (100, 400, 700, 1000)  # one step over sequences of these contexts


def child(repo: str) -> None:
    sys.path[:0] = [repo, repo + "/scripts/micro"]
    from micro_setup import BLOCK_SIZE, decode_items, default_runner

    from common.model.runner import DecodeItem

    def mixed_items():
        items, next_block = [], 0
        for index, context in enumerate(MIXED):
            blocks = -(-(context + 1) // BLOCK_SIZE)
            items.append(DecodeItem(100 + index, context, list(range(next_block, next_block + blocks))))
            next_block += blocks
        return items

    times = {}
    for weights in ("fp32", "fp16"):
        runner = default_runner(2048, weights)
        runner.model.add_blocked_copies()
        for batch, context in (*STEPS, (len(MIXED), None)):
            step = decode_items(batch, context) if context else mixed_items()
            for _ in range(2):
                runner.run_decode(step)
            samples = []
            for _ in range(9):
                start = time.perf_counter()
                runner.run_decode(step)
                samples.append((time.perf_counter() - start) * 1e3)
            times[f"{weights} batch {batch} context {context or 'mixed'}"] = statistics.median(samples)
    print(json.dumps(times))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("old")
    parser.add_argument("new", nargs="?", default=str(Path(__file__).resolve().parents[2]))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.old)
    from micro_setup import (
        print_machine,  # this checkout's: the children run on the same machine
    )
    print_machine()
    runs = {"old": [], "new": []}
    for _ in range(args.rounds):
        for name in ("old", "new"):
            out = subprocess.run([sys.executable, __file__, "--child", getattr(args, name)], check=True,
                                 capture_output=True, text=True).stdout
            runs[name].append(json.loads(out.strip().splitlines()[-1]))
    print(f"old {args.old}, new {args.new}: median over {args.rounds} rounds of each child's median step, ms")
    for key in runs["old"][0]:
        old, new = (statistics.median(run[key] for run in runs[name]) for name in ("old", "new"))
        print(f"{key:>30}: old {old:6.1f}  new {new:6.1f}  old/new x{old / new:.2f}")


if __name__ == "__main__":
    main()
