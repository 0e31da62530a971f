"""What a bench invocation leaves in its output directory: summary.json (every run's figures), report.md
(a markdown table and the roofline lines), requests.jsonl (every request's client-side record) and PNG plots."""

import json
from dataclasses import asdict
from pathlib import Path

from pdserve.bench.loadgen import RequestResult


def write_requests(path: Path, run_index: int, name: str, results: list[RequestResult]) -> None:
    with open(path, "a") as f:
        for r in results:
            record = asdict(r) | {"run": run_index, "name": name, "num_tokens": r.num_tokens}
            del record["token_ids"]  # the reply's ids fed a later turn; num_tokens counts them
            record["token_times_s"] = [round(t, 6) for t in r.token_times_s]
            f.write(json.dumps(record) + "\n")


def write_summary(out_dir: Path, summary: dict) -> Path:
    path = out_dir / "summary.json"
    path.write_text(json.dumps(summary, indent=2) + "\n")
    return path


def _p(block: dict, key: str) -> str:
    value = block.get(key)
    return "-" if value is None else f"{value:.0f}"


def _triple(block: dict) -> str:
    return " / ".join(_p(block, k) for k in ("p50", "p90", "p99"))


def _batch(run: dict) -> str:
    mean = (run.get("decode_batch") or {}).get("mean_per_step")
    return "-" if mean is None else f"{mean:.1f}"


def _kv(run: dict) -> str:
    kv = run.get("kv_transfer")
    if not kv:
        return "-"
    rate = f", {kv['mb_per_s']:.0f} MB/s" if kv.get("mb_per_s") else ""
    tail = kv["tail_ms"]["p50"]
    return f"{kv['bytes'] / 1e6:.0f} MB{rate}, tail p50 {tail:.1f} ms" if tail is not None else f"{kv['bytes'] / 1e6:.0f} MB{rate}"


def _spec(run: dict) -> str:
    """acceptance rate | tokens per verify step (mean over requests), or dashes for a run without speculation."""
    spec = run.get("speculation")
    if not spec:
        return "- | -"
    return f"{spec['acceptance_rate']:.2f} | {spec['tokens_per_verify_step']['mean']:.2f}"


def runs_table(runs: list[dict]) -> str:
    lines = ["| run | workload | load | done/planned | out tok/s | TTFT ms p50/p90/p99 | TPOT ms p50/p90/p99 "
             "| e2e ms p50/p90/p99 | goodput req/s | mean decode batch | KV pushed | spec acceptance "
             "| tokens/verify step | peak RSS GB | load avg |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for run in runs:
        lines.append(
            f"| {run['name']} | {run['workload']} | {run['load']} "
            f"| {run['num_completed']}/{run['num_requests'] + run.get('num_not_sent', 0)} "
            f"| {run['output_tokens_per_s']:.1f} | {_triple(run['ttft_ms'])} | {_triple(run['tpot_ms'])} "
            f"| {_triple(run['e2e_ms'])} | {run['goodput_rps']:.3f} | {_batch(run)} | {_kv(run)} | {_spec(run)} "
            f"| {_rss(run)} | {run.get('load_average_1m_at_start', '-')} |")
    return "\n".join(lines)


def _rss(run: dict) -> str:
    """Peak resident memory: the peer's processes together, then each (decode 1.23, prefill ...), in GB."""
    rss = run.get("rss_bytes") or {}
    if not rss:
        return "-"
    parts = ", ".join(f"{name} {value / 1e9:.2f}" for name, value in rss.items() if name != "total")
    return f"{rss['total'] / 1e9:.2f} ({parts})"


def by_kind_table(runs: list[dict]) -> str:
    lines = ["| run | workload | load | class | TTFT ms p50/p99 | TPOT ms p50/p99 |", "|---|---|---|---|---|---|"]
    for run in runs:
        if len(run.get("by_kind", {})) < 2:
            continue
        for kind, block in run["by_kind"].items():
            ttft, tpot = block["ttft_ms"], block["tpot_ms"]
            lines.append(f"| {run['name']} | {run['workload']} | {run['load']} | {kind} "
                         f"| {_p(ttft, 'p50')} / {_p(ttft, 'p99')} | {_p(tpot, 'p50')} / {_p(tpot, 'p99')} |")
    return "\n".join(lines) if len(lines) > 2 else ""


def _share(paths: dict[str, float]) -> str:
    return ", ".join(f"{path} {100 * share:.0f}%" for path, share in paths.items()) or "-"


def _prefix_cells(run: dict) -> str:
    """cached tokens / request (share of the prompt) | KV pushed / request | prefill paths."""
    prefix = run.get("prefix")
    if not prefix:
        return "- | - | -"
    share = prefix["cached_share_of_prompt"]
    cached = f"{prefix['mean_cached_tokens']:.0f}" + (f" ({100 * share:.0f}%)" if share is not None else "")
    return f"{cached} | {prefix['mean_kv_bytes'] / 1e6:.2f} MB | {_share(prefix['prefill_paths'])}"


def _decode_kv_cells(run: dict) -> str:
    """batch max (sampled in the run / any step since start) / mean per step | preemptions (most waiting)."""
    batch, kv = run.get("decode_batch") or {}, run.get("decode_kv") or {}
    peak = kv.get("max_batch_size_since_start")
    sizes = (f"{batch.get('max_running', '-')} / {'-' if peak is None else peak} / "
             f"{'-' if batch.get('mean_per_step') is None else format(batch['mean_per_step'], '.1f')}")
    preempted = f"{kv['num_preemptions']} ({kv['max_preempted_waiting']})" if kv else "-"
    return f"{sizes} | {preempted}"


def _answers(run: dict) -> str:
    answers = run.get("answer_tokens")
    if not answers:
        return "-"
    ended = answers["finish_reasons"]
    done = sum(ended.values())
    by_eos = f", {100 * ended.get('FINISH_REASON_STOP', 0) / done:.0f}% by EOS" if done else ""
    return f"{_p(answers['tokens'], 'p50')} / {_p(answers['tokens'], 'mean')}{by_eos}"


def kv_table(runs: list[dict]) -> str:
    """Prefix reuse, KV pushed and the decode pool, per run (shown when a run reports them)."""
    if not any(run.get("prefix") or run.get("decode_kv") for run in runs):
        return ""
    lines = [("| run | workload | load | out tok/s | TTFT ms p50 / p95 | cached tokens/req (of prompt) "
              "| KV pushed/req | prefill path | decode batch max sampled / max since start / mean "
              "| preemptions (most waiting) | refused, retried | answer tokens p50 / mean |"),
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for run in runs:
        ttft = run["ttft_ms"]
        lines.append(f"| {run['name']} | {run['workload']} | {run['load']} | {run['output_tokens_per_s']:.1f} "
                     f"| {_p(ttft, 'p50')} / {_p(ttft, 'p95')} | {_prefix_cells(run)} | {_decode_kv_cells(run)} "
                     f"| {run.get('num_refused_retried', '-')} | {_answers(run)} |")
    return "\n".join(lines)


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def speculation_table(rows: list[dict]) -> str:
    """Speculation off vs on, same workload and load (runner.speculation_comparison)."""
    lines = ["| workload | load | off / on | TPOT ms p50 off / on | speedup p50 | TPOT ms p99 off / on | speedup p99 "
             "| decode ms/token off / on | speedup | out tok/s off / on | acceptance | tokens/verify step |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        p50, p99, tps = row["tpot_ms_p50"], row["tpot_ms_p99"], row["output_tokens_per_s"]
        per_token = row.get("decode_ms_per_token") or {}
        lines.append(
            f"| {row['workload']} | {row['load']} | {row['off']} / {row['on']} | {_p(p50, 'off')} / {_p(p50, 'on')} "
            f"| {_ratio(row['tpot_speedup_p50'])} | {_p(p99, 'off')} / {_p(p99, 'on')} "
            f"| {_ratio(row['tpot_speedup_p99'])} | {_p(per_token, 'off')} / {_p(per_token, 'on')} "
            f"| {_ratio(row.get('decode_speedup_token_weighted'))} | {tps['off']:.1f} / {tps['on']:.1f} "
            f"| {_spec({'speculation': row.get('speculation')})} |")
    return "\n".join(lines)


def verify_cost_lines(summary: dict) -> list[str]:
    costs = summary.get("verify_step_costs")
    if not costs:
        return []
    series = ", ".join(f"k={k} {c:.2f}" for k, c in enumerate(costs["relative_cost"]))
    lines = [f"Verifying k drafts in one batch-1 decode step costs, in plain steps ({costs['threads']} thread(s), "
             f"the decode tier's own start-up measurement, repeated here after the peers stopped; median of "
             f"{len(costs['series'])}): {series}."]
    for name, line in (costs.get("logged_by_peer") or {}).items():
        lines.append(f"- {name}'s log: {line}" if line else f"- {name}'s log holds no step-cost line.")
    return lines


def roofline_lines(summary: dict) -> list[str]:
    roof = summary.get("roofline")
    if not roof:
        return []
    lines = [f"The model: {roof['num_parameters'] / 1e6:.1f} M parameters = {roof['weight_bytes'] / 1e6:.0f} MB of "
             "fp32 weights, all read once per decode step (the floors below are fp32's; each batch-1 line uses the weights "
             "its peer serves). Measured on this machine now:", ""]
    for m in roof["machine"]:
        lines.append(f"- {m['threads']} thread(s): memory bandwidth {m['memory_bandwidth_gbs']} GB/s (fp32 sum over "
                     f"256 MiB) -> batch-1 step floor {m['batch1_step_floor_ms']} ms; fp32 matmul "
                     f"{m['matmul_gflops']} GFLOP/s (2048^3) -> throughput ceiling "
                     f"{m['saturated_tokens_per_s_ceiling']:.0f} tokens/s (FLOP/s / (2 x parameters))")
    lines.append("")
    for b in roof["batch1"]:
        read = f"{b['weights']} weights, {b['weight_bytes'] / 1e6:.0f} MB: " if "weights" in b else ""
        lines.append(f"- batch-1 decode step, {b['name']} ({b['threads']} thread(s)): {b['step_ms']:.1f} ms measured "
                     f"(TPOT p50, one client) vs floor {b['floor_ms']:.1f} ms ({read}bytes read / bandwidth): "
                     f"{b['step_ms'] / b['floor_ms']:.1f}x the floor")
    for s in roof["saturated"]:
        lines.append(f"- throughput, {s['name']} ({s['threads']} thread(s)): best {s['output_tokens_per_s']:.1f} output "
                     f"tokens/s ({s['load']}) vs ceiling {s['ceiling']:.0f}: "
                     f"{100 * s['output_tokens_per_s'] / s['ceiling']:.0f}% of it")
    return lines


def _pool(summary: dict) -> str:
    blocks = summary.get("kv_blocks")
    return f"{blocks} blocks per tier" if blocks else "sized by each tier's --kv-memory-mb default"


def write_markdown(out_dir: Path, summary: dict) -> Path:
    w = summary["workload"]
    parts = [f"# pdserve bench: {w['name']}", "",
             f"{summary['created']}, commit {summary['git_commit']}.", "", f"Machine: {summary['machine']}", "",
             f"Workload `{w['name']}`: {w['description']}; {w['num_requests']} requests, seed {w['seed']}. "
             f"Goodput objectives: TTFT <= {summary['slo']['ttft_ms']:g} ms and TPOT <= {summary['slo']['tpot_ms']:g} ms. "
             f"pdserve peers: weights {summary.get('pdserve_weights', 'fp32')} (unless the peer's name says), KV "
             f"{summary.get('kv_dtype', 'float32')}, KV pool "
             f"{_pool(summary)}.",
             "", runs_table(summary["runs"]), "",
             "TTFT, TPOT and e2e are measured at the client. done/planned: completed within the run's time cap / "
             "requests planned. KV pushed: prompt KV bytes sent prefill -> decode; MB/s over the push window (prefill compute plus the transfer tail, since pages leave layer by layer as they are computed); tail: transfer time left after compute ended. load avg: the machine's 1-minute load average as the run started (other work "
             "competing for the cores when it exceeds their number). peak RSS: each process's peak resident memory "
             "(VmHWM) up to the run's end, summed over the peer's processes, then per process.", ""]
    kv = kv_table(summary["runs"])
    if kv:
        parts += ["## Prefix reuse and the KV pool", "", kv, "",
                  ("Per completed request, from the gateway's last response: cached tokens (usage.cached_tokens: "
                   "prompt tokens whose KV a prefix cache held; in brackets, their share of all prompt tokens sent), "
                   "KV pushed prefill -> decode (timings.kv_bytes), prefill path (timings.prefill_path). From the "
                   "decode instance's Stats: the largest running batch sampled during the run, the largest batch any "
                   "step has run since the instance started (warm-up and earlier runs included), the mean batch per "
                   "step in the run; preemptions during the run (the most sequences waiting after one at a time). "
                   "Refused, retried: refusals for room sent again (`--retry-refused`). Answer tokens: tokens "
                   "received per completed request, and the share ended by end-of-sequence (the bench sends no stop "
                   "strings)."), ""]
    kinds = by_kind_table(summary["runs"])
    if kinds:
        parts += ["Per request class:", "", kinds, ""]
    if summary.get("peers"):
        parts += ["Cores:", ""] + [f"- {p['name']}: {p['cpus']}" for p in summary["peers"]] + [""]
    for skipped in summary.get("skipped", []):
        parts.append(f"- {skipped['name']} skipped: {skipped['reason']}")
    if summary.get("speculation_comparison"):
        parts += ["", "## Speculation off vs on", "", speculation_table(summary["speculation_comparison"]), "",
                  "speedup = TPOT off / TPOT on (above 1: faster with speculation; a pdserve-spec / pdserve-draft "
                  "row compares the draft model with prompt lookup); decode ms/token: the run's "
                  "time from first to last token summed over requests / tokens after the first (token-weighted, "
                  "where TPOT percentiles weigh each request alike). acceptance: accepted / proposed "
                  "draft tokens over the run; tokens/verify step: mean over requests of the tokens each verifying "
                  "step produced (both from the responses' `speculation` field).", ""] + verify_cost_lines(summary)
    parts += ["", "## Roofline", ""] + roofline_lines(summary)
    path = out_dir / "report.md"
    path.write_text("\n".join(parts).rstrip() + "\n")
    return path
