"""Decode and verification step times with and without the oneDNN-blocked weight copies, side by side.

    .venv/bin/python scripts/micro/blocked_weights.py      (one thread, context 128, default model, fp32)
"""
import statistics
import time

from micro_setup import decode_items as items
from micro_setup import default_runner, print_machine

print_machine()
runner = default_runner(num_blocks=1024); model = runner.model
print("linears given a blocked copy:", model.add_blocked_copies())
linears = model.linears()
blocked = [lin.blocked for lin in linears]
def single(): [setattr(lin, "blocked", None) for lin in linears]
def dual(): [setattr(lin, "blocked", b) for lin, b in zip(linears, blocked)]
base = {}
for batch, drafts in ((1, 0), (1, 1), (1, 2), (1, 3), (1, 4), (1, 6), (1, 8), (2, 0), (4, 0), (8, 0), (16, 0), (32, 0)):
    it = items(batch, 128, drafts); res = {"single": [], "dual": []}
    for m in (single, dual): m(); runner.run_decode(it)
    for _ in range(7):
        for name, m in (("single", single), ("dual", dual)):
            m(); t = time.perf_counter(); runner.run_decode(it); res[name].append((time.perf_counter() - t) * 1e3)
    s, d = statistics.median(res["single"]), statistics.median(res["dual"])
    if (batch, drafts) == (1, 0): base = {"single": s, "dual": d}
    print(f"batch {batch:2d} drafts {drafts}: single layout {s:6.1f} ms ({s / base['single']:.2f} steps)  "
          f"with blocked copy {d:6.1f} ms ({d / base['single']:.2f} single-layout steps)  x{s / d:.2f}", flush=True)
