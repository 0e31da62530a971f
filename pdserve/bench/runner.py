"""One `pdserve bench` invocation: the same requests against each target (a running gateway, or peers it
starts and stops one after another), a warm-up, an optional batch-1 probe, one run per workload and load;
then the roofline micro-benchmarks (after every peer has stopped, so they measure an idle machine), the
decode tier's verify-step cost when a speculating peer ran, and the report."""

import os
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import grpc
from tqdm import tqdm

from common.basics.config import DecodeConfig
from common.edge.server import Tls, make_channel
from common.runtime.machine import describe_machine, machine_facts
from pdserve.bench import plots, report
from pdserve.bench.loadgen import LoadSpec, run_load
from pdserve.bench.memory import RssSampler
from pdserve.bench.metrics import (
    Slo,
    decode_batch,
    decode_kv,
    e2e_ms,
    kv_transfer,
    summarize,
    tpot_ms,
    ttft_ms,
)
from pdserve.bench.peer_process import PeerOptions, PeerUnavailable
from pdserve.bench.peers import DISAGGREGATED, PEERS, TOKEN_IDS_ONLY, weights_of
from pdserve.bench.request import BenchRequest
from pdserve.bench.roofline import (
    count_parameters,
    roofline,
    served_weight_bytes,
    verify_step_costs,
)
from pdserve.bench.stats_poller import StatsPoller
from pdserve.bench.workloads import WORKLOADS, make_requests, workload_requests
from pdserve.certs import gateway_identity
from pdserve.v1 import decode_pb2, decode_pb2_grpc

# Bytes per KV element, and per (token, KV head) row for the scale of the quantised dtypes (common/kv/quant.py).
_KV_ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2, "int8": 1, "fp8": 1}
_KV_ROW_SCALE_BYTES = {"int8": 4, "fp8": 4}


@dataclass
class ExternalTarget:
    """A gateway someone else runs (`--address`)."""

    name: str
    gateway_address: str
    stats_address: str | None
    stats_tls: Tls | None = None  # mutual TLS to the decode tier's Stats, when its stack has certificates
    cpus: str = "not managed by the harness"
    process = None  # no process of the harness's: nothing to sample for memory

    def stop(self) -> None:
        pass


@dataclass
class Collected:
    runs: list[dict]
    latencies: list[tuple[str, dict[str, list[float]]]]


def kv_bytes_per_token(stats_address: str | None, tls: Tls | None) -> int | None:
    """K and V of one token in every layer, scales included, from the decode instance's CompatInfo (None if it
    has none)."""
    if not stats_address:
        return None
    try:
        with make_channel(stats_address, tls) as channel:
            info = decode_pb2_grpc.DecodeStub(channel).GetInfo(decode_pb2.GetInfoRequest(), timeout=5)
    except grpc.RpcError:
        return None
    return kv_bytes_per_token_of(info.kv_dtype, info.num_layers, info.num_kv_heads, info.head_dim)


def kv_bytes_per_token_of(kv_dtype: str, num_layers: int, num_kv_heads: int, head_dim: int) -> int:
    row_bytes = head_dim * _KV_ITEMSIZE.get(kv_dtype, 4) + _KV_ROW_SCALE_BYTES.get(kv_dtype, 0)
    return 2 * num_layers * num_kv_heads * row_bytes


def run_one(target, workload: str, requests: list[BenchRequest], load: LoadSpec, slo: Slo, kv_bpt: int | None,
            progress: bool) -> tuple[dict, list]:
    load_average = os.getloadavg()[0]  # other work on the machine, for the record
    bar = tqdm(total=len(requests), desc=f"{target.name} | {workload} | {load.label}", unit="req",
               disable=not progress, leave=True)
    with StatsPoller(target.stats_address, target.stats_tls) as poller, \
            RssSampler(target.process.pid if target.process else None) as rss:
        results, duration_s = run_load(target.gateway_address, requests, load, on_done=lambda _: bar.update())
    bar.close()
    run = {"name": target.name, "workload": workload, "load": load.label, "mode": load.mode,
           **({"rate_rps": load.value} if load.mode == "poisson" else {"concurrency": int(load.value)}),
           **summarize(results, duration_s, slo), "num_not_sent": len(requests) - len(results),
           "decode_batch": decode_batch(poller.samples), "decode_kv": decode_kv(poller.samples),
           "kv_transfer": kv_transfer(results, kv_bpt), "load_average_1m_at_start": round(load_average, 2),
           "rss_bytes": rss.summary()}
    return run, results


def bench_target(target, args, requests: dict[str, list[BenchRequest]], loads: list[LoadSpec], slo: Slo,
                 out_dir: Path, collected: Collected) -> None:
    """requests: each workload's requests, run in order, every load on each."""
    kv_bpt = kv_bytes_per_token(target.stats_address, target.stats_tls)
    if args.warmup:
        warm = make_requests(WORKLOADS["smoke"], args.warmup, args.seed + 1)
        run_load(target.gateway_address, warm, LoadSpec("closed", min(args.warmup, 4), args.max_duration_s))
    plan = [(workload, reqs, load) for workload, reqs in requests.items() for load in loads]
    if args.batch1_probe:
        probe = make_requests(WORKLOADS["batch1"], args.batch1_probe, args.seed)
        plan.insert(0, ("batch1", probe, LoadSpec("closed", 1, args.max_duration_s)))
    for workload, reqs, load in plan:
        run, results = run_one(target, workload, reqs, load, slo, kv_bpt, not args.no_progress)
        run["cpus"] = target.cpus
        report.write_requests(out_dir / "requests.jsonl", len(collected.runs), target.name, results)
        collected.runs.append(run)
        done = [r for r in results if r.ok]
        collected.latencies.append((f"{target.name} | {workload} | {load.label}", {
            "TTFT": [ttft_ms(r) for r in done], "e2e": [e2e_ms(r) for r in done],
            "TPOT": [t for r in done if (t := tpot_ms(r)) is not None]}))
        planned = run["num_requests"] + run.get("num_not_sent", 0)
        print(f"  {target.name} | {workload} | {load.label}: {run['num_completed']}/{planned} done, "
              f"{run['output_tokens_per_s']:.1f} output tok/s, TTFT p50 {run['ttft_ms']['p50']} ms, "
              f"TPOT p50 {run['tpot_ms']['p50']} ms, p99 {run['tpot_ms']['p99']} ms, "
              f"peak RSS {run['rss_bytes'].get('total', 0) / 1e9:.2f} GB"
              + (f", acceptance {spec['acceptance_rate']:.2f}, {spec['tokens_per_verify_step']['mean']:.2f} tokens "
                 "per verify step" if (spec := run.get("speculation")) else ""), flush=True)


def _targets(args, options: PeerOptions) -> list[tuple[str, Callable]]:
    if args.address:
        return [(args.name, lambda: ExternalTarget(args.name, args.address, args.stats_address,
                                                   gateway_identity(args.certs_dir)))]
    return [(name, lambda start=PEERS[name]: start(options)) for name in args.peers]


# Speculating peers and the peers they are compared with (same stack, speculation off; and the draft model
# against prompt lookup).
SPECULATION_BASELINES = {"pdserve-spec": ("pdserve",), "pdserve-draft": ("pdserve", "pdserve-spec")}


def context_per_slot(requests: dict[str, list[BenchRequest]]) -> int:
    """Context a single-sequence slot needs (llama-server's): the longest session's prompts and new tokens,
    rounded up to 256."""
    sessions: dict[object, int] = {}
    for reqs in requests.values():
        for r in reqs:
            key = r.index if r.session is None else ("session", r.session)
            sessions[key] = sessions.get(key, 0) + len(r.prompt_ids) + r.max_new_tokens
    longest = max(sessions.values(), default=256)
    return -(-longest // 256) * 256


def _engine_threads(name: str, options: PeerOptions) -> int:
    cpus = options.decode_cpus if name in DISAGGREGATED else options.engine_cpus
    return len(cpus) if cpus else len(os.sched_getaffinity(0))


def roofline_summary(model_dir: Path, runs: list[dict], threads_of: dict[str, int],
                     weights_of: dict[str, str] | None = None) -> dict:
    """Machine figures per thread count; each batch-1 run against the floor of the weights it serves
    (weights_of: peer -> format, fp32 when absent)."""
    machine = {t: roofline(model_dir, t) for t in sorted(set(threads_of.values()))}
    params = count_parameters(model_dir)
    weights_of = weights_of or {}
    served = {w: served_weight_bytes(model_dir, w)
              for w in {weights_of.get(r["name"], "fp32") for r in runs if r["workload"] == "batch1"}}
    batch1 = []
    for r in runs:
        if r["workload"] == "batch1" and r["tpot_ms"]["p50"] is not None:
            name, weights = r["name"], weights_of.get(r["name"], "fp32")
            read = served[weights]
            bandwidth = machine[threads_of[name]]["memory_bandwidth_gbs"]
            batch1.append({"name": name, "threads": threads_of[name], "step_ms": r["tpot_ms"]["p50"],
                           "weights": weights, "weight_bytes": read,
                           "floor_ms": round(read / (bandwidth * 1e9) * 1000, 2)})
    saturated = []
    for name in dict.fromkeys(r["name"] for r in runs):
        best = max((r for r in runs if r["name"] == name and r["workload"] != "batch1"),
                   key=lambda r: r["output_tokens_per_s"], default=None)
        if best:
            saturated.append({"name": name, "threads": threads_of[name], "load": best["load"],
                              "output_tokens_per_s": best["output_tokens_per_s"],
                              "ceiling": machine[threads_of[name]]["saturated_tokens_per_s_ceiling"]})
    return {"num_parameters": params, "weight_bytes": params * 4, "machine": list(machine.values()),
            "batch1": batch1, "saturated": saturated}


def speculation_comparison(runs: list[dict]) -> list[dict]:
    """Each speculating peer's run against its baseline's run on the same workload and load: TPOT (p50, p99),
    token-weighted decode time per token and output tokens/s off and on, speedups = off / on, and what
    speculation did."""
    rows = []
    pairs = [(on, off) for on in runs for baseline in SPECULATION_BASELINES.get(on["name"], ()) for off in runs
             if off["name"] == baseline and off["workload"] == on["workload"] and off["load"] == on["load"]]
    for on, off in pairs:
        row = {"workload": on["workload"], "load": on["load"], "off": off["name"], "on": on["name"],
               "speculation": on.get("speculation")}
        for p in ("p50", "p99"):
            a, b = off["tpot_ms"][p], on["tpot_ms"][p]
            row[f"tpot_ms_{p}"] = {"off": a, "on": b}
            row[f"tpot_speedup_{p}"] = round(a / b, 3) if a and b else None
        a, b = off.get("decode_ms_per_token"), on.get("decode_ms_per_token")
        row["decode_ms_per_token"] = {"off": a, "on": b}
        row["decode_speedup_token_weighted"] = round(a / b, 3) if a and b else None
        a, b = off["output_tokens_per_s"], on["output_tokens_per_s"]
        row["output_tokens_per_s"] = {"off": a, "on": b}
        row["throughput_ratio"] = round(b / a, 3) if a else None
        rows.append(row)
    return rows


def _logged_step_costs(log_path: Path) -> str | None:
    """The decode tier's start-up line on its verify-step costs, where the peer's log holds it."""
    try:
        lines = log_path.read_text(errors="replace").splitlines()
    except OSError:
        return None
    return next((line.strip() for line in lines if "step cost verifying" in line), None)


def git_commit() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "diff-index", "--quiet", "HEAD", "--"], capture_output=True).returncode
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head.stdout.strip() + (" + uncommitted changes" if dirty else "")


def machine_description() -> str:
    """describe_machine(), then what this run adds: threads are pinned per process, and the load average as
    the run starts (other work competing for the cores)."""
    load1, load5, _ = os.getloadavg()
    return (f"{describe_machine()}; threads per process as pinned; "
            f"load average {load1:.1f} / {load5:.1f} at the start")


def _loads(args) -> list[LoadSpec]:
    retry = getattr(args, "retry_refused", False)
    loads = [LoadSpec("poisson", rate, args.max_duration_s, args.seed, retry) for rate in args.rates]
    loads += [LoadSpec("closed", clients, args.max_duration_s, args.seed, retry) for clients in args.concurrency]
    return loads or [LoadSpec("poisson", 1.0, args.max_duration_s, args.seed, retry)]


def execute(args) -> dict:
    """Runs every target and writes the report; returns the summary."""
    out_dir = args.out or Path("bench-results") / datetime.now().strftime("%Y%m%d-%H%M%S")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "requests.jsonl").unlink(missing_ok=True)
    workloads = [WORKLOADS[name] for name in args.workload]
    requests = workload_requests(workloads, args.num_requests, args.seed, args.model,
                                 getattr(args, "max_new_tokens", None))
    text_workloads = [w.name for w in workloads if any(c.text for c in w.classes)]
    slo = Slo(args.slo_ttft_ms, args.slo_tpot_ms)
    options = PeerOptions(model_dir=args.model, log_dir=out_dir / "logs", certs_dir=args.certs_dir,
                          prefill_cpus=args.prefill_cpus,
                          decode_cpus=args.decode_cpus, gateway_cpus=args.gateway_cpus,
                          max_batch_size=args.max_batch_size, draft_model=getattr(args, "draft_model", None),
                          fixed_k=getattr(args, "fixed_k", False), weights=getattr(args, "pdserve_weights", "fp32"),
                          kv_blocks=getattr(args, "kv_blocks", 0),
                          kv_dtype=getattr(args, "kv_dtype", "float32"),
                          llama_server_slots=getattr(args, "llama_server_slots", 16),
                          context_per_slot=context_per_slot(requests))
    summary = {"created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "git_commit": git_commit(),
               "machine": machine_description(), "machine_facts": machine_facts(), "command": args.command_line,
               "workload": {"name": ",".join(w.name for w in workloads),
                            "description": workloads[0].description if len(workloads) == 1 else
                            "; ".join(f"{w.name}: {w.description}" for w in workloads),
                            "num_requests": args.num_requests, "seed": args.seed},
               "workloads": [{"name": w.name, "description": w.description} for w in workloads],
               "slo": {"ttft_ms": slo.ttft_ms, "tpot_ms": slo.tpot_ms}, "pdserve_weights": options.weights,
               "kv_blocks": options.kv_blocks or None, "kv_dtype": options.kv_dtype,
               "peers": [], "skipped": []}
    collected = Collected([], [])
    for name, start in _targets(args, options):
        if name in TOKEN_IDS_ONLY and text_workloads and not args.address:
            reason = (f"takes prompt_token_ids only; the text workload(s) {', '.join(text_workloads)} "
                      "need a pdserve peer")
            print(f"pdserve bench: {name} skipped: {reason}", flush=True)
            summary["skipped"].append({"name": name, "reason": reason})
            continue
        try:
            target = start()
        except (PeerUnavailable, RuntimeError) as error:  # not installed here, or it failed to start
            print(f"pdserve bench: {name} skipped: {error}", flush=True)
            summary["skipped"].append({"name": name, "reason": str(error)})
            continue
        summary["peers"].append({"name": target.name, "cpus": target.cpus})
        try:
            bench_target(target, args, requests, _loads(args), slo, out_dir, collected)
        finally:
            target.stop()
    summary["runs"] = collected.runs
    summary["load_average_end"] = [round(v, 2) for v in os.getloadavg()]
    comparison = speculation_comparison(collected.runs)
    if comparison:
        summary["speculation_comparison"] = comparison
    if args.roofline and collected.runs:
        threads = {p["name"]: _engine_threads(p["name"], options) for p in summary["peers"]}
        weights = {p["name"]: weights_of(p["name"], options) for p in summary["peers"]}
        summary["roofline"] = roofline_summary(args.model, collected.runs, threads, weights)
        speculating = [p["name"] for p in summary["peers"] if p["name"] in SPECULATION_BASELINES]
        if speculating:
            # the peer passes no --num-speculative-tokens: it proposes up to the decode tier's default
            costs = verify_step_costs(args.model, threads[speculating[0]], DecodeConfig.num_speculative_tokens)
            costs["logged_by_peer"] = {name: _logged_step_costs(options.log_dir / f"{name}.log")
                                       for name in speculating}
            summary["verify_step_costs"] = costs
    write_outputs(out_dir, summary, collected)
    return summary


def write_outputs(out_dir: Path, summary: dict, collected: Collected) -> None:
    report.write_summary(out_dir, summary)
    report.write_markdown(out_dir, summary)
    main_runs = [r for r in collected.runs if r["workload"] != "batch1"]
    plots.latency_cdfs(out_dir / "latency_cdf.png",
                       [s for s, r in zip(collected.latencies, collected.runs) if r["workload"] != "batch1"])
    plots.throughput_vs_rate(out_dir / "throughput_vs_rate.png", main_runs)
    plots.decode_batch(out_dir / "decode_batch.png", main_runs)
    print(f"pdserve bench: wrote {out_dir}/summary.json, report.md, latency_cdf.png, throughput_vs_rate.png, "
          "decode_batch.png, requests.jsonl", flush=True)
