"""Profiles a running stack for the planner: prefill time against uncached prompt tokens, decode step time
against batch and context, the KV transfer tail and the fixed overhead of a request, all through the gateway as a
client sees them (the responses' timings give prefill compute and the transfer tail).

Prefill prompts are random token ids (seeded, distinct per request), so no prefix cache helps, and long enough
(64+) that the gateway never prefills them on the decode tier. A decode step's time is read where every sequence
of a batch is generating: between the last first token and the first last token of B requests sent together.
So that B requests of a long context start decoding together (not one prefill after another), they share all
but their last 16 tokens, which one request puts in the prefix caches first: each then prefills 16 tokens, and
decodes over the whole context.
"""

import random
import statistics
import time

import numpy as np

from pdserve.bench.loadgen import LoadSpec, RequestResult, run_load
from pdserve.bench.request import BenchRequest
from pdserve.plan.simulate import Profile

PREFILL_TOKENS = (64, 256, 512, 1024)
DECODE_BATCHES = (1, 4, 16)
DECODE_CONTEXTS = (64, 768)
DECODE_NEW_TOKENS = 48
_REPEATS = 3
_UNIQUE_TOKENS = 16  # a decode measurement's requests differ only in their last tokens (see above)


def _prompt(rng: random.Random, tokens: int) -> tuple[int, ...]:
    return tuple(rng.randrange(1000, 40000) for _ in range(tokens))


def _run(address: str, requests: list[BenchRequest], clients: int, max_s: float = 300.0) -> list[RequestResult]:
    results, _ = run_load(address, requests, LoadSpec("closed", clients, max_s))
    failed = [r for r in results if not r.ok]
    if failed:
        raise RuntimeError(f"{len(failed)} profiling request(s) failed ({failed[0].error}); is the stack serving?")
    return results


def _window_step_ms(results: list[RequestResult]) -> float:
    """Time per step while all of `results` were generating: the window from the last first token to the first
    last token, over the tokens each got in it (their mean)."""
    firsts = [r.sent_s + r.token_times_s[0] for r in results]
    lasts = [r.sent_s + r.token_times_s[-1] for r in results]
    start, end = max(firsts), min(lasts)
    counts = [sum(1 for t in r.token_times_s if start < r.sent_s + t <= end) for r in results]
    if end <= start or min(counts) < 4:  # they hardly overlapped: each one's own time per token
        return statistics.median((r.token_times_s[-1] - r.token_times_s[0]) * 1000 / (r.num_tokens - 1)
                                 for r in results)
    return (end - start) * 1000 / statistics.mean(counts)


def _fit(rows: list[list[float]], values: list[float]) -> tuple[float, ...]:
    solution, *_ = np.linalg.lstsq(np.array(rows, dtype=float), np.array(values, dtype=float), rcond=None)
    return tuple(float(v) for v in solution)


def core_scaling() -> float:
    """Speed of a prefill-sized matrix product on two threads over one: what twice the cores buys (a proxy
    measured in this process, not on the stack)."""
    import torch

    a, b = torch.randn(512, 576), torch.randn(576, 1536)
    before = torch.get_num_threads()
    times = {}
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            a @ b
            start = time.perf_counter()
            for _ in range(20):
                a @ b
            times[threads] = time.perf_counter() - start
    finally:
        torch.set_num_threads(before)
    return max(times[1] / times[2], 1.0)


def profile_stack(address: str, cores_per_instance: float = 1.0, seed: int = 0, machine: str = "",
                  progress=print) -> tuple[Profile, dict]:
    """The profile, and the raw measurements it was fitted to."""
    rng = random.Random(f"plan-profile:{seed}")
    index = iter(range(10**9))
    _run(address, [BenchRequest(next(index), "warm", _prompt(rng, 64), 4) for _ in range(2)], 1)
    prefill = []
    for tokens in PREFILL_TOKENS:
        requests = [BenchRequest(next(index), "prefill", _prompt(rng, tokens), 1) for _ in range(_REPEATS)]
        for r in _run(address, requests, 1):
            prefill.append({"tokens": tokens, "prefill_ms": r.prefill_ms, "tail_ms": r.kv_transfer_ms,
                            "ttft_ms": r.token_times_s[0] * 1000})
        progress(f"  prefill {tokens} tokens: {statistics.median(p['prefill_ms'] for p in prefill[-_REPEATS:]):.1f} ms")
    steps = []
    for context in DECODE_CONTEXTS:
        for batch in DECODE_BATCHES:
            shared = _prompt(rng, context - _UNIQUE_TOKENS)
            _run(address, [BenchRequest(next(index), "prefix", shared + _prompt(rng, _UNIQUE_TOKENS), 1)], 1)
            requests = [BenchRequest(next(index), "decode", shared + _prompt(rng, _UNIQUE_TOKENS), DECODE_NEW_TOKENS)
                        for _ in range(batch)]
            step = _window_step_ms(_run(address, requests, batch))
            steps.append({"batch": batch, "context": context, "step_ms": step})
            progress(f"  decode batch {batch} at {context} tokens of context: {step:.1f} ms per step")
    prefill_fit = _fit([[1, p["tokens"], p["tokens"] ** 2] for p in prefill], [p["prefill_ms"] for p in prefill])
    middle = DECODE_NEW_TOKENS // 2  # the context grows while the step is timed: its middle
    step_fit = _fit([[1, s["batch"], s["batch"] * (s["context"] + middle)] for s in steps],
                    [s["step_ms"] for s in steps])
    tail = statistics.median(p["tail_ms"] for p in prefill)
    overhead = statistics.median(p["ttft_ms"] - p["prefill_ms"] - p["tail_ms"] for p in prefill)
    profile = Profile(prefill_ms=prefill_fit, step_ms=step_fit, transfer_tail_ms=tail, overhead_ms=max(overhead, 0.0),
                      cores_per_instance=cores_per_instance, core_scaling=core_scaling(), machine=machine)
    return profile, {"prefill": prefill, "decode_steps": steps}
