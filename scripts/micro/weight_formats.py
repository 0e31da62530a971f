import statistics
import sys
import time

from micro_setup import decode_items as items
from micro_setup import default_runner, print_machine

print_machine()
runners = {fmt: default_runner(num_blocks=512, weights=fmt) for fmt in sys.argv[1:]}
for batch in (1, 2, 4, 8):
    it = items(batch, 128); res = {f: [] for f in runners}
    for f, r in runners.items(): r.run_decode(it)
    for _ in range(7):
        for f, r in runners.items():
            t = time.perf_counter(); r.run_decode(it); res[f].append((time.perf_counter() - t) * 1e3)
    print(f"batch {batch}: " + "  ".join(f"{f} {statistics.median(v):6.1f} ms" for f, v in res.items()), flush=True)
