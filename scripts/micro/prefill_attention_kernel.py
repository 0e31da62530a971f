import time

import torch
import torch.nn.functional as F
from micro_setup import print_machine

print_machine()
torch.set_num_threads(1)
for n in (512, 1024):
    q = torch.randn(9, n, 64); k = torch.randn(3, n, 64); v = torch.randn(3, n, 64)
    def gqa(): return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    def expand(): return F.scaled_dot_product_attention(q[None], k.repeat_interleave(3, 0)[None], v.repeat_interleave(3, 0)[None], is_causal=True)
    def expand_view(): return F.scaled_dot_product_attention(q.view(3, 3, n, 64), k[:, None].expand(3, 3, n, 64), v[:, None].expand(3, 3, n, 64), is_causal=True)
    ref = gqa()
    for name, f in (("gqa", gqa), ("expand", expand), ("expand_view", expand_view)):
        out = f().reshape(9, n, 64); f()
        t = time.perf_counter(); [f() for _ in range(3)]; dt = (time.perf_counter() - t) / 3
        print(n, name, f"{dt*1e3:.1f} ms", torch.allclose(out, ref, atol=1e-5))
