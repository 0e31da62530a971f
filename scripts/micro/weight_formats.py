import sys, time, torch, statistics
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[2]))
from pathlib import Path
from common.model.weights import load_model
from common.kv_pool import KvPool
from common.model.runner import ModelRunner, DecodeItem
torch.set_num_threads(1)
md = Path.home() / ".cache/pdserve/models/SmolLM2-135M-Instruct"
runners = {}
for fmt in sys.argv[1:]:
    model = load_model(md, fmt); c = model.config
    kv = KvPool(num_layers=c.num_layers, num_blocks=512, block_size=16, num_kv_heads=c.num_kv_heads, head_dim=c.head_dim, dtype=torch.float32)
    runners[fmt] = ModelRunner(model, kv)
def items(batch, ctx):
    n = -(-(ctx + 1) // 16)
    return [DecodeItem(token_id=100 + b, position=ctx, block_table=list(range(b*n, b*n + n))) for b in range(batch)]
for batch in (1, 2, 4, 8):
    it = items(batch, 128); res = {f: [] for f in runners}
    for f, r in runners.items(): r.run_decode(it)
    for _ in range(7):
        for f, r in runners.items():
            t = time.perf_counter(); r.run_decode(it); res[f].append((time.perf_counter() - t) * 1e3)
    print(f"batch {batch}: " + "  ".join(f"{f} {statistics.median(v):6.1f} ms" for f, v in res.items()), flush=True)
