"""What a batch-1 decode step spends outside its matrix products: the step as served, then the same step
with every linear swapped for a stand-in that returns a preallocated output at no cost.

    .venv/bin/python scripts/micro/step_overhead.py [WEIGHTS]      (one thread, context 128; default fp16)
"""
import statistics
import sys
import time

import torch
from micro_setup import decode_items as items
from micro_setup import default_runner, print_machine

print_machine()
runner = default_runner(1024, sys.argv[1] if len(sys.argv) > 1 else "fp16"); model = runner.model
model.add_blocked_copies()
step = items(1, 128)


def median_step_ms(repeats: int = 15) -> float:
    for _ in range(3):
        runner.run_decode(step)
    times = []
    for _ in range(repeats):
        start = time.perf_counter(); runner.run_decode(step); times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


class FreeLinear:
    def __init__(self, linear):
        self.out = linear(torch.zeros(1, linear.in_features))

    def __call__(self, x):
        return self.out.expand(x.shape[0], -1)


full = median_step_ms()
for layer in model.layers:
    for owner, name in ((layer, "qkv"), (layer, "out"), (layer.mlp, "gate_up"), (layer.mlp, "down")):
        object.__setattr__(owner, name, FreeLinear(getattr(owner, name)))
model.lm_head = FreeLinear(model.lm_head)
print(f"batch-1 step {full:.1f} ms; without its matrix products {median_step_ms():.1f} ms")
