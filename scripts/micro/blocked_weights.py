"""Decode and verification step times with and without the oneDNN-blocked weight copies, side by side.

    .venv/bin/python scripts/micro/blocked_weights.py      (one thread, context 128, default model, fp32)
"""
import sys, time, statistics
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[2]))
from pathlib import Path
import torch
from common.kv_pool import KvPool
from common.model.linear import DenseLinear
from common.model.runner import ModelRunner, DecodeItem
from common.model.weights import load_model
torch.set_num_threads(1)
md = Path.home() / ".cache/pdserve/models/SmolLM2-135M-Instruct"
model = load_model(md, "fp32"); c = model.config
print("linears given a blocked copy:", model.add_blocked_copies())
linears = [model.lm_head] + [lin for layer in model.layers for lin in (layer.qkv, layer.out, *layer.mlp.linears())]
blocked = [lin.blocked for lin in linears]
def single(): [setattr(lin, "blocked", None) for lin in linears]
def dual(): [setattr(lin, "blocked", b) for lin, b in zip(linears, blocked)]
kv = KvPool(num_layers=c.num_layers, num_blocks=1024, block_size=16, num_kv_heads=c.num_kv_heads, head_dim=c.head_dim,
            dtype=torch.float32)
runner = ModelRunner(model, kv)
def items(batch, ctx, drafts=0):
    n = -(-(ctx + 1 + drafts) // 16)
    return [DecodeItem(100 + b, ctx, list(range(b*n, b*n + n)), draft_ids=tuple(range(200, 200 + drafts)))
            for b in range(batch)]
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
