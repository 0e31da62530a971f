import sys, time, torch, statistics
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[2]))
from pathlib import Path
import torch.nn.functional as F
from common.model.weights import load_model
from common.kv_pool import KvPool
from common.model.linear import DenseLinear
from common.model.runner import ModelRunner, DecodeItem
torch.set_num_threads(1)
md = Path.home() / ".cache/pdserve/models/SmolLM2-135M-Instruct"
model = load_model(md, "fp32"); c = model.config
# the old layout: (out, in) contiguous, F.linear
for layer in model.layers:
    for lin in (layer.qkv, layer.out, layer.mlp.gate_up, layer.mlp.down):
        lin.w_old = lin.weight.contiguous()
model.lm_head.w_old = model.lm_head.weight.contiguous()
new_call = DenseLinear.__call__
def old(): DenseLinear.__call__ = lambda self, x: F.linear(x, self.w_old)
def new(): DenseLinear.__call__ = new_call
kv = KvPool(num_layers=c.num_layers, num_blocks=512, block_size=16, num_kv_heads=c.num_kv_heads, head_dim=c.head_dim, dtype=torch.float32)
runner = ModelRunner(model, kv)
def items(batch, ctx, drafts=0):
    n = -(-(ctx + 1 + drafts) // 16)
    return [DecodeItem(100 + b, ctx, list(range(b*n, b*n + n)), draft_ids=tuple(range(200, 200 + drafts))) for b in range(batch)]
for batch, drafts in ((1, 0), (1, 1), (1, 2), (1, 4), (2, 0), (4, 0), (8, 0), (16, 0)):
    it = items(batch, 128, drafts); res = {"old": [], "new": []}
    for m in (old, new): m(); a = runner.run_decode(it)
    for _ in range(9):
        for name, m in (("old", old), ("new", new)):
            m(); t = time.perf_counter(); runner.run_decode(it); res[name].append((time.perf_counter() - t) * 1e3)
    o, n = statistics.median(res["old"]), statistics.median(res["new"])
    print(f"batch {batch} drafts {drafts}: F.linear {o:6.1f} ms  x@Wt {n:6.1f} ms  x{o/n:.2f}", flush=True)
