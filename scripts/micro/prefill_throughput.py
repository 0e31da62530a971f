import sys
import time

import torch
from micro_setup import default_runner, print_machine

from common.model.runner import PrefillChunk

print_machine()
runner = default_runner(num_blocks=256)
a = torch.randn(2048, 2048); b = torch.randn(2048, 2048); a @ b
t = time.perf_counter(); a @ b; a @ b; mm = 2 * 2 * 2048**3 / (time.perf_counter() - t) / 1e9
for n in (128, 512, 1024):
    ids = list(range(1000, 1000 + n))
    runner.run_prefill([PrefillChunk(ids, 0, list(range(0, n // 16 + 1)))])
    t = time.perf_counter(); runner.run_prefill([PrefillChunk(ids, 0, list(range(0, n // 16 + 1)))]); dt = time.perf_counter() - t
    print(f"prefill {n}: {dt*1e3:.0f} ms, {n/dt:.0f} tok/s, {2*134.5e6*n/dt/1e9:.1f} GFLOP/s (matmul peak now {mm:.0f})")
if "--profile" in sys.argv:
    from torch.profiler import profile
    ids = list(range(1000, 1512))
    with profile() as p: runner.run_prefill([PrefillChunk(ids, 0, list(range(0, 33)))])
    print(p.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))
