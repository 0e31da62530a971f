"""TTFT and time per output token with --kv-transport grpc and nixl, side by side: both stacks up at once (the
test suite's launcher helper: `pdserve up` on free ports, mutual TLS), the same prompts sent to each in turn,
alternating which goes first, so drift in the machine's speed falls on both alike. Long prompts (900 words, 24
new tokens) and chat-sized ones (80 words, 48 new tokens), prefix caching off, prefill chunks of 256 tokens.
Usage, from the repository root: .venv/bin/python scripts/bench/kv_transport_ab.py [ROUNDS]   (about 2 minutes
for 8 rounds on 2 cores)
"""

import os
import random
import statistics
import sys
import time
from contextlib import ExitStack

sys.path[:0] = [".", "tests/support"]
from helpers import request  # noqa: E402
from stack import running_stack  # noqa: E402

from common.basics.config import default_model_dir  # noqa: E402

model = default_model_dir(os.environ.get("XDG_CACHE_HOME"), os.path.expanduser("~"))
words = "harbour ledger salt cloth tea ship clerk port barrel crate rope sail tide anchor".split()
with ExitStack() as es:
    flags = ("--no-prefix-caching", "--chunk-size", "256", "--max-batch-tokens", "512")
    stacks = {t: es.enter_context(running_stack(model, "--kv-transport", t, *flags)) for t in ("grpc", "nixl")}
    res = {t: {"ttft": [], "tpot": []} for t in stacks}
    for i in range(int(sys.argv[1]) if len(sys.argv) > 1 else 8):
        rnd = random.Random(i)
        for kind, n, new in (("long", 900, 24), ("chat", 80, 48)):
            prompt = " ".join(rnd.choice(words) for _ in range(n))
            order = list(stacks) if i % 2 == 0 else list(reversed(stacks))
            for t in order:
                start, times = time.monotonic(), []
                for reply in stacks[t].gateway.Generate(request(prompt, max_new_tokens=new, speculative=False),
                                                        timeout=120):
                    if reply.token_ids:
                        times.append(time.monotonic())
                res[t]["ttft"].append((kind, (times[0] - start) * 1000))
                if len(times) > 2:
                    res[t]["tpot"].append((kind, (times[-1] - times[0]) * 1000 / (len(times) - 1)))
    for t in stacks:
        for kind in ("long", "chat"):
            tt = [v for k, v in res[t]["ttft"] if k == kind]
            tp = [v for k, v in res[t]["tpot"] if k == kind]
            print(f"{t:5} {kind:5} TTFT median {statistics.median(tt):8.1f} ms  time per output token median "
                  f"{statistics.median(tp):6.1f} ms  ({len(tt)} requests)")
