"""Whether torch.compile pays for a decode step on this CPU: the model's decode forward (one thread, a batch at
context 128) eager, then compiled (inductor, static shapes: one compilation per shape), medians of interleaved steps, and what compiling cost.

    .venv/bin/python scripts/micro/compiled_step.py [WEIGHTS] [BATCH]      (defaults fp16 1)
"""
import statistics
import sys
import time

import torch
from micro_setup import decode_items as items
from micro_setup import default_runner, print_machine

print_machine()
weights = sys.argv[1] if len(sys.argv) > 1 else "fp16"
batch = int(sys.argv[2]) if len(sys.argv) > 2 else 1
runner = default_runner(1024, weights)
runner.model.add_blocked_copies()
step = items(batch, 128)
eager = runner.model.decode
compiled = torch.compile(eager, dynamic=False)  # dynamic=True fails in inductor here (a broadcast of two symbolic sizes)


def timed(forward, repeats: int = 15) -> float:
    runner.model.decode = forward
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        runner.run_decode(step)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


start = time.perf_counter()
runner.model.decode = compiled
with torch.no_grad():
    runner.run_decode(step)
compile_s = time.perf_counter() - start
timed(eager, 3)
rounds = [(timed(eager), timed(compiled)) for _ in range(3)]
e, c = statistics.median(r[0] for r in rounds), statistics.median(r[1] for r in rounds)
print(f"{weights}, batch {batch}: eager {e:.1f} ms, compiled {c:.1f} ms ({e / c:.2f}x), first compiled step "
      f"(compiling) {compile_s:.0f} s")
