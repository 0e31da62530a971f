"""Decode, verification and prefill-chunk step times, fp32 weights (with their oneDNN-blocked copies) against
fp16 weights with FBGEMM's packed copies, side by side in one process (fidelity: docs/fidelity.md).

    .venv/bin/python scripts/micro/fp16_weights.py      (one thread, context 128, default model)
"""
import statistics
import time

import torch
from micro_setup import decode_items as items
from micro_setup import default_runner, print_machine

from common.model.runner import PrefillChunk

print_machine()
runners = {"fp32": default_runner(1024, "fp32"), "fp16": default_runner(1024, "fp16")}
for name, runner in runners.items():
    print(f"{name}: linears given a copy: {runner.model.add_blocked_copies()}")
ids = torch.randint(0, 49152, (1, 256), generator=torch.Generator().manual_seed(0))[0]
for batch, drafts in ((1, 0), (1, 1), (1, 4), (1, 8), (4, 0), (8, 0), (16, 0), (32, 0), ("prefill 256", 0)):
    res = {name: [] for name in runners}
    for _ in range(5 if batch == "prefill 256" else 9):
        for name, runner in runners.items():
            t = time.perf_counter()
            if batch == "prefill 256":
                runner.run_prefill([PrefillChunk(ids.tolist(), 0, list(range(900, 916)))])
            else:
                runner.run_decode(items(batch, 128, drafts))
            res[name].append((time.perf_counter() - t) * 1e3)
    a, b = statistics.median(res["fp32"]), statistics.median(res["fp16"])
    print(f"batch {batch} drafts {drafts}: fp32 {a:7.1f} ms  fp16 {b:7.1f} ms  fp32/fp16 x{a / b:.2f}", flush=True)
