import statistics
import time

from micro_setup import default_runner, print_machine

import common.model.runner as R
from common.model.runner import DecodeItem

print_machine()
runner = default_runner(num_blocks=2048)
new_plan, new_use = R.plan_groups, R._blocks_in_use
def old(): R.plan_groups = lambda n: [list(range(len(n)))]; R._blocks_in_use = lambda item, bs: len(item.block_table)
def new(): R.plan_groups, R._blocks_in_use = new_plan, new_use
def batch(shorts, short_ctx, reserve, long_ctx):
    items, nb = [], 0
    for i, ctx in enumerate([short_ctx] * shorts + ([long_ctx] if long_ctx else [])):
        n = (ctx + reserve) // 16 + 1
        items.append(DecodeItem(100 + i, ctx, list(range(nb, nb + n)))); nb += n
    return items
for shorts, sc, reserve, lc in ((1, 128, 96, 0), (4, 128, 96, 0), (8, 100, 96, 1000), (16, 100, 96, 1000), (16, 100, 96, 0)):
    it = batch(shorts, sc, reserve, lc); res = {"old": [], "new": []}
    for mode in (old, new): mode(); runner.run_decode(it)
    for _ in range(7):
        for name, mode in (("old", old), ("new", new)):
            mode(); t = time.perf_counter(); runner.run_decode(it); res[name].append((time.perf_counter() - t) * 1e3)
    o, n = statistics.median(res["old"]), statistics.median(res["new"])
    print(f"{shorts} x ctx {sc} (+{reserve} reserved) + long {lc}: old {o:6.1f} ms  new {n:6.1f} ms  x{o/n:.2f}", flush=True)
