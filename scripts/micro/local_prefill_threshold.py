"""Conditional disaggregation's threshold, measured: TTFT of prompts of several lengths (no prefix cached) through
a stack that prefills every prompt on the prefill tier (--local-prefill-tokens 0) and one that prefills every prompt
on the decode instance (--local-prefill-tokens 100000), side by side, alone and with background decoding load.

    .venv/bin/python scripts/micro/local_prefill_threshold.py [--lengths 8,16,32,64,128,256] [--repeats 5]

Prints median TTFT per length and path; the default threshold (common/basics/config.py LOCAL_PREFILL_TOKENS) is the
longest prompt whose local TTFT beats the prefill tier's under load, and the figures go to docs/benchmarks.md."""

import argparse
import random
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests" / "support"))

from helpers import collect, request  # noqa: E402
from stack import running_stack  # noqa: E402

from common.basics.config import default_model_dir  # noqa: E402
from common.runtime.machine import describe_machine  # noqa: E402


def _ttft_ms(stack, ids: list[int]) -> float:
    _, _, last = collect(stack.gateway, request(token_ids=ids, max_new_tokens=2, speculative=False))
    return last.timings.time_to_first_token_ms


def _background(stack, stop: threading.Event, rng: random.Random, tpot_ms: list[float]) -> None:
    """Two long decodes at a time: what a local prefill holds up (their time per output token), and what holds
    it up."""
    while not stop.is_set():
        ids = [rng.randrange(1000, 40000) for _ in range(64)]
        _, _, last = collect(stack.gateway, request(token_ids=ids, max_new_tokens=48, speculative=False))
        tpot_ms.append(last.timings.decode_ms / max(last.usage.completion_tokens - 1, 1))


def measure(model_dir: Path, threshold: int, lengths: list[int], repeats: int,
            loaded: bool) -> tuple[dict[int, float], float]:
    """Median TTFT per prompt length, and the background decodes' median time per output token meanwhile."""
    rng = random.Random(threshold * 7 + loaded)
    # the launcher's defaults for chunks (tests/support/stack.py makes them small otherwise)
    with running_stack(model_dir, "--local-prefill-tokens", str(threshold), "--no-prefix-caching",
                       "--chunk-size", "256", "--max-batch-tokens", "512") as stack:
        _ttft_ms(stack, [1000, 1001, 1002])  # warm-up
        stop, tpot_ms = threading.Event(), []
        load = [threading.Thread(target=_background, args=(stack, stop, random.Random(i), tpot_ms), daemon=True)
                for i in range(2 if loaded else 0)]
        for thread in load:
            thread.start()
        time.sleep(1.0 if loaded else 0.0)
        try:
            ttft = {n: statistics.median(_ttft_ms(stack, [rng.randrange(1000, 40000) for _ in range(n)])
                                         for _ in range(repeats)) for n in lengths}
        finally:
            stop.set()
            for thread in load:
                thread.join()
        return ttft, statistics.median(tpot_ms) if tpot_ms else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", default="8,16,32,64,128,256")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    lengths = [int(n) for n in args.lengths.split(",")]
    model_dir = default_model_dir(None, str(Path.home()))
    print(f"machine: {describe_machine()}")
    for loaded in (False, True):
        tier, tier_tpot = measure(model_dir, 0, lengths, args.repeats, loaded)
        local, local_tpot = measure(model_dir, 100_000, lengths, args.repeats, loaded)
        print(f"\n{'with 2 background decodes' if loaded else 'idle'}: median TTFT ms over {args.repeats}")
        print("| prompt tokens | prefill tier | decode-local |\n|---|---|---|")
        for n in lengths:
            print(f"| {n} | {tier[n]:.1f} | {local[n]:.1f} |")
        if loaded:
            print(f"| background TPOT ms (median) | {tier_tpot:.1f} | {local_tpot:.1f} |")


if __name__ == "__main__":
    main()
