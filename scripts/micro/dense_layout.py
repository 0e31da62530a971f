import statistics
import time

import torch.nn.functional as F
from micro_setup import decode_items as items
from micro_setup import default_runner, print_machine

from common.model.linear import DenseLinear

print_machine()
runner = default_runner(num_blocks=512)
# the old layout: (out, in) contiguous, F.linear
for lin in runner.model.linears():
    lin.w_old = lin.weight.contiguous()
new_call = DenseLinear.__call__
def old(): DenseLinear.__call__ = lambda self, x: F.linear(x, self.w_old)
def new(): DenseLinear.__call__ = new_call
for batch, drafts in ((1, 0), (1, 1), (1, 2), (1, 4), (2, 0), (4, 0), (8, 0), (16, 0)):
    it = items(batch, 128, drafts); res = {"old": [], "new": []}
    for m in (old, new): m(); a = runner.run_decode(it)
    for _ in range(9):
        for name, m in (("old", old), ("new", new)):
            m(); t = time.perf_counter(); runner.run_decode(it); res[name].append((time.perf_counter() - t) * 1e3)
    o, n = statistics.median(res["old"]), statistics.median(res["new"])
    print(f"batch {batch} drafts {drafts}: F.linear {o:6.1f} ms  x@Wt {n:6.1f} ms  x{o/n:.2f}", flush=True)
