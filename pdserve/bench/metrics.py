"""Per-run metrics from client-side timings, as serving benchmarks define them:

- TTFT: from sending a request to receiving its first token.
- TPOT: a request's mean time per output token after the first, (e2e - TTFT) / (tokens - 1).
- e2e: from sending to the last token.
- output tokens/s: tokens received by all requests / the run's wall time.
- goodput: requests per second that completed with TTFT <= its objective AND TPOT <= its objective.
- prefix reuse, per request, from the last response: prompt tokens found in a prefix cache
  (usage.cached_tokens), KV bytes pushed prefill -> decode (timings.kv_bytes) and the prefill path
  (timings.prefill_path); and over the run, from the decode instance's Stats: preemptions, the largest batch.
Percentiles are numpy's (linear interpolation) over the requests that completed.
"""

from dataclasses import dataclass

import numpy as np

from pdserve.bench.loadgen import RequestResult
from pdserve.bench.stats_poller import StatsSample

PERCENTILES = (50, 90, 95, 99)


@dataclass(frozen=True)
class Slo:
    ttft_ms: float
    tpot_ms: float


def ttft_ms(r: RequestResult) -> float:
    return r.token_times_s[0] * 1000


def e2e_ms(r: RequestResult) -> float:
    return r.token_times_s[-1] * 1000


def tpot_ms(r: RequestResult) -> float | None:
    """None for a one-token request (it has no time per output token)."""
    if r.num_tokens < 2:
        return None
    return (r.token_times_s[-1] - r.token_times_s[0]) * 1000 / (r.num_tokens - 1)


def percentiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {f"p{p}": None for p in (*PERCENTILES,)} | {"mean": None}
    found = np.percentile(np.asarray(values, dtype=np.float64), PERCENTILES)
    return {f"p{p}": round(float(v), 3) for p, v in zip(PERCENTILES, found)} | {"mean": round(float(np.mean(values)), 3)}


def decode_ms_per_token(results: list[RequestResult]) -> float | None:
    """Decode time per token over the whole run, token-weighted: the completed requests' time from first to
    last token, summed, / their tokens after the first, summed (TPOT's percentiles weigh every request alike)."""
    done = [r for r in results if r.ok and r.num_tokens >= 2]
    tokens = sum(r.num_tokens - 1 for r in done)
    if not tokens:
        return None
    return round(sum(r.token_times_s[-1] - r.token_times_s[0] for r in done) * 1000 / tokens, 3)


def meets(r: RequestResult, slo: Slo) -> bool:
    tpot = tpot_ms(r)
    return r.ok and ttft_ms(r) <= slo.ttft_ms and (tpot is None or tpot <= slo.tpot_ms)


def latency_block(results: list[RequestResult]) -> dict:
    done = [r for r in results if r.ok]
    return {
        "ttft_ms": percentiles([ttft_ms(r) for r in done]),
        "tpot_ms": percentiles([t for r in done if (t := tpot_ms(r)) is not None]),
        "e2e_ms": percentiles([e2e_ms(r) for r in done]),
    }


def summarize(results: list[RequestResult], duration_s: float, slo: Slo) -> dict:
    """The run's figures (without name and load, which the caller adds)."""
    done = [r for r in results if r.ok]
    output_tokens = sum(r.num_tokens for r in results)
    kinds = sorted({r.kind for r in results})
    return {
        "num_requests": len(results),
        "num_completed": len(done),
        "num_failed": len(results) - len(done),
        "errors": sorted({r.error for r in results if r.error}),
        "duration_s": round(duration_s, 3),
        "input_tokens": sum(r.prompt_tokens for r in results),
        "output_tokens": output_tokens,
        "output_tokens_per_s": round(output_tokens / duration_s, 3) if duration_s > 0 else 0.0,
        "request_throughput_rps": round(len(done) / duration_s, 4) if duration_s > 0 else 0.0,
        **latency_block(results),
        "decode_ms_per_token": decode_ms_per_token(results),
        "goodput_rps": round(sum(meets(r, slo) for r in results) / duration_s, 4) if duration_s > 0 else 0.0,
        "slo": {"ttft_ms": slo.ttft_ms, "tpot_ms": slo.tpot_ms},
        "slo_attainment": round(sum(meets(r, slo) for r in results) / len(results), 4) if results else 0.0,
        "by_kind": {kind: latency_block([r for r in results if r.kind == kind]) for kind in kinds},
        "answer_tokens": answer_lengths(results),
        "num_refused_retried": sum(r.num_refused for r in results),
        **({"prefix": prefix} if (prefix := prefix_reuse(results)) else {}),
        **({"speculation": spec} if (spec := speculation(results)) else {}),
    }


def decode_batch(samples: list[tuple[float, int, int, int, float]]) -> dict:
    """Batch size over time from Stats samples (seconds, running, steps, tokens, sequences stepped): the
    running-batch series, and the mean batch per decode step over the run (sequences stepped / steps run
    between the first and the last sample). Tokens per step is apart from it: a step that verifies
    speculated tokens makes several tokens for one sequence."""
    if len(samples) < 2:
        return {"samples": [], "mean_per_step": None, "max_running": None, "num_steps": 0}
    steps = samples[-1][2] - samples[0][2]
    tokens = samples[-1][3] - samples[0][3]
    stepped = samples[-1][4] - samples[0][4]
    return {
        "samples": [[round(s[0], 3), s[1]] for s in samples],
        "mean_per_step": round(stepped / steps, 3) if steps else None,
        "tokens_per_step": round(tokens / steps, 3) if steps else None,
        "max_running": max(s[1] for s in samples),
        "num_steps": steps,
        "tokens_generated": tokens,
    }


def speculation(results: list[RequestResult]) -> dict | None:
    """What speculative decoding did over a run, from the completed requests' `speculation` fields: the
    acceptance rate over all proposals (accepted / proposed draft tokens) and tokens per verify step, the
    mean and median of the requests' own figures. None when no request reports speculation."""
    spec = [r for r in results if r.ok and r.speculated]
    if not spec:
        return None
    proposed = sum(r.spec_proposed for r in spec)
    accepted = sum(r.spec_accepted for r in spec)
    per_step = [r.spec_tokens_per_verify_step for r in spec]
    return {
        "num_requests": len(spec),
        "num_proposed": proposed,
        "num_accepted": accepted,
        "acceptance_rate": round(accepted / proposed, 4) if proposed else 0.0,
        "tokens_per_verify_step": {"mean": round(float(np.mean(per_step)), 3),
                                   "p50": round(float(np.percentile(per_step, 50)), 3)},
    }


def answer_lengths(results: list[RequestResult]) -> dict:
    """How long the completed requests' answers were and how they ended: a long max_new_tokens budget means
    little when answers end by end-of-sequence far sooner."""
    done = [r for r in results if r.ok]
    reasons = sorted({r.finish_reason for r in done if r.finish_reason})
    return {"tokens": percentiles([r.num_tokens for r in done]),
            "finish_reasons": {reason: sum(r.finish_reason == reason for r in done) for reason in reasons}}


def _reports_prefix(r: RequestResult) -> bool:
    return bool(r.prefill_path or r.cached_tokens or r.kv_bytes)


def prefix_reuse(results: list[RequestResult]) -> dict | None:
    """Per completed request: prompt tokens whose KV a prefix cache held, KV bytes pushed prefill -> decode,
    and the share of requests on each prefill path. None when no response reports them (a peer without the
    fields)."""
    done = [r for r in results if r.ok]
    if not any(_reports_prefix(r) for r in done):
        return None
    prompt_tokens, cached_tokens = sum(r.prompt_tokens for r in done), sum(r.cached_tokens for r in done)
    paths = sorted({r.prefill_path or "unreported" for r in done})
    return {
        "mean_cached_tokens": round(cached_tokens / len(done), 1),
        "cached_share_of_prompt": round(cached_tokens / prompt_tokens, 4) if prompt_tokens else None,
        "mean_kv_bytes": round(float(np.mean([r.kv_bytes for r in done]))),
        "prefill_paths": {p: round(sum((r.prefill_path or "unreported") == p for r in done) / len(done), 4)
                          for p in paths},
    }


def decode_kv(samples: list[StatsSample]) -> dict | None:
    """The decode instance's KV pool over a run, from its Stats: preemptions (during the run), the most
    sequences waiting after one, the largest batch a step has run (since the instance started: the warm-up
    and earlier runs count), prefix-cache tokens found / looked up and local prefills (during the run)."""
    if len(samples) < 2:
        return None
    first, last = samples[0], samples[-1]
    queried = last.num_prefix_query_tokens - first.num_prefix_query_tokens
    return {
        "num_preemptions": last.num_preemptions - first.num_preemptions,
        "max_preempted_waiting": max(s.num_preempted_waiting for s in samples),
        "max_batch_size_since_start": last.max_batch_size,
        "num_cached_blocks_end": last.num_cached_blocks,
        "prefix_hit_rate": round((last.num_prefix_hit_tokens - first.num_prefix_hit_tokens) / queried, 4)
        if queried else None,
        "num_local_prefills": last.num_local_prefills - first.num_local_prefills,
    }


def kv_transfer(results: list[RequestResult], kv_bytes_per_token: int | None) -> dict | None:
    """KV bytes pushed prefill -> decode and the rate over the window the push takes: it starts with prefill
    compute (pages leave layer by layer) and ends at decode's acknowledgement, so bytes / (prefill_ms +
    kv_transfer_ms). kv_transfer_ms alone is the tail that was not hidden behind compute. The bytes are the
    responses' timings.kv_bytes where the gateway reports them (`measured`), else every prompt token's K and V
    in every layer."""
    moved = [r for r in results if r.ok and (r.prefill_ms or r.kv_transfer_ms)]
    measured = any(_reports_prefix(r) for r in results)
    if not moved or (kv_bytes_per_token is None and not measured):
        return None
    total_bytes = sum(r.kv_bytes if measured else r.prompt_tokens * kv_bytes_per_token for r in moved)
    window_s = sum(r.prefill_ms + r.kv_transfer_ms for r in moved) / 1000
    return {
        "bytes": total_bytes,
        "measured": measured,
        "bytes_per_token": kv_bytes_per_token,
        "mb_per_s": round(total_bytes / 1e6 / window_s, 2) if window_s else None,
        "tail_ms": percentiles([r.kv_transfer_ms for r in moved]),
    }
