"""`pdserve plan`: how many prefill and decode instances a target rate needs, and whether to disaggregate at all.

    pdserve plan profile --address 127.0.0.1:50051 --out profile.json      # measure a running stack
    pdserve plan simulate --profile profile.json --topology 1P2D --rate 0.5 --workload mixed
    pdserve plan recommend --profile profile.json --rate 2 --ttft-ms 2000 --tpot-ms 100 --max-instances 6

An arrival trace is a bench workload's requests at Poisson arrivals (the same ones `pdserve bench --rates`
sends, for the same --num-requests and --seed), or a JSONL file of {"arrival_s", "prompt_tokens",
"output_tokens"} per line (--trace)."""

import argparse
import json
import re
import sys
from dataclasses import asdict
from pathlib import Path

from pdserve.command import Command

_TOPOLOGY = re.compile(r"^(?:(\d+)P(\d+)D|unified(?:x(\d+))?)$")


def _topology(text: str) -> tuple[int, int]:
    match = _TOPOLOGY.match(text)
    if not match:
        raise argparse.ArgumentTypeError(f"expected NPMD (e.g. 1P2D) or unified / unifiedxN, got {text!r}")
    if match.group(1):
        prefill, decode = int(match.group(1)), int(match.group(2))
        if prefill < 1 or decode < 1:
            raise argparse.ArgumentTypeError(f"a disaggregated topology needs >= 1 of each tier, got {text!r}")
        return prefill, decode
    return 0, int(match.group(3) or 1)


def _positive(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def _add_trace(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--profile", type=Path, required=True, help="a profile written by `pdserve plan profile`")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--workload", default="mixed", help="a bench workload (token-id workloads: mixed, long, chat, "
                                                          "batch1, smoke)")
    source.add_argument("--trace", type=Path, help="JSONL arrivals: arrival_s, prompt_tokens, output_tokens")
    parser.add_argument("--rate", type=_positive, help="Poisson arrivals, req/s (with --workload)")
    parser.add_argument("--num-requests", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, help="every request's output length, replacing the "
                                                          "workload's (as `pdserve bench --max-new-tokens`)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-batch-size", type=int, default=32, help="decode batch limit")
    parser.add_argument("--json", type=Path, help="also write the result as JSON here")


def _add_arguments(parser: argparse.ArgumentParser, _model_dir: Path) -> None:
    sub = parser.add_subparsers(dest="plan_command", required=True)
    profile = sub.add_parser("profile", help="measure a running stack's costs through its gateway")
    profile.add_argument("--address", required=True, help="the gateway, host:port")
    profile.add_argument("--cores-per-instance", type=_positive, default=1.0,
                         help="cores each of the stack's prefill and decode instances has (as pinned)")
    profile.add_argument("--out", type=Path, required=True, help="where the profile goes (JSON)")
    profile.add_argument("--seed", type=int, default=0)
    simulate = sub.add_parser("simulate", help="predicted TTFT and TPOT of one topology for an arrival trace")
    _add_trace(simulate)
    simulate.add_argument("--topology", type=_topology, required=True, help="NPMD (e.g. 1P2D), or unified[xN]")
    simulate.add_argument("--prefill-cores", type=_positive, help="cores of the whole prefill tier (default: "
                                                                  "cores per instance x instances)")
    simulate.add_argument("--decode-cores", type=_positive, help="cores of the whole decode tier (unified: of all "
                                                                 "engines)")
    recommend = sub.add_parser("recommend", help="the smallest topology meeting TTFT and TPOT objectives")
    _add_trace(recommend)
    recommend.add_argument("--ttft-ms", type=_positive, required=True, help="p99 TTFT objective")
    recommend.add_argument("--tpot-ms", type=_positive, required=True, help="p99 TPOT objective")
    recommend.add_argument("--max-instances", type=int, default=6, help="most instances in all (each on its own "
                                                                         "cores per instance)")


def _arrivals(args):
    from pdserve.bench.workloads import WORKLOADS, make_requests, poisson_offsets_s
    from pdserve.plan.simulate import Arrival

    if args.trace:
        rows = [json.loads(line) for line in args.trace.read_text().splitlines() if line.strip()]
        try:
            return [Arrival(float(r["arrival_s"]), int(r["prompt_tokens"]), int(r["output_tokens"])) for r in rows]
        except (KeyError, ValueError, TypeError) as error:
            raise SystemExit(f"pdserve plan: {args.trace}: each line needs arrival_s, prompt_tokens and "
                             f"output_tokens ({error})") from None
    workload = WORKLOADS.get(args.workload)
    if workload is None or workload.needs_tokenizer or any(c.text for c in workload.classes):
        raise SystemExit(f"pdserve plan: --workload {args.workload!r} is not a token-id workload; use mixed, long, "
                         "chat, batch1 or smoke, or --trace")
    if args.rate is None:
        raise SystemExit("pdserve plan: --workload needs --rate (req/s)")
    requests = sorted(make_requests(workload, args.num_requests, args.seed), key=lambda r: r.index)
    offsets = poisson_offsets_s(len(requests), args.rate, args.seed)
    return [Arrival(at, len(r.prompt_ids), args.max_new_tokens or r.max_new_tokens) for at, r in zip(offsets, requests)]


def _load_profile(path: Path):
    from pdserve.plan.simulate import Profile

    try:
        data = json.loads(path.read_text())
        return Profile(**{k: tuple(v) if isinstance(v, list) else v for k, v in data["profile"].items()})
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise SystemExit(f"pdserve plan: {path} is not a profile `pdserve plan profile` wrote ({error})") from None


def _row(label: str, summary: dict) -> str:
    def f(v):
        return "-" if v is None else f"{v:.0f}"

    t, p = summary["ttft_ms"], summary["tpot_ms"]
    return (f"| {label} | {f(t['p50'])} | {f(t['p99'])} | {f(p['p50'])} | {f(p['p99'])} "
            f"| {summary['num_finished']}/{summary['num_requests']} |")


def _meets(summary: dict, ttft_ms: float, tpot_ms: float) -> bool:
    return (summary["num_finished"] == summary["num_requests"] and summary["ttft_ms"]["p99"] is not None
            and summary["ttft_ms"]["p99"] <= ttft_ms and (summary["tpot_ms"]["p99"] or 0) <= tpot_ms)


_HEADER = ["| topology | TTFT p50 ms | TTFT p99 ms | TPOT p50 ms | TPOT p99 ms | finished |", "|---|---|---|---|---|---|"]


def _run(args, _model_dir: Path) -> int:
    from pdserve.plan.simulate import Topology, simulate, summarize

    if args.plan_command == "profile":
        from common.runtime.machine import describe_machine
        from pdserve.plan.profile import profile_stack

        print(f"pdserve plan: profiling {args.address}", flush=True)
        profile, raw = profile_stack(args.address, args.cores_per_instance, args.seed, describe_machine())
        args.out.write_text(json.dumps({"profile": asdict(profile), "measured": raw}, indent=1))
        print(f"pdserve plan: wrote {args.out}: prefill ms = {profile.prefill_ms}, step ms = {profile.step_ms}, "
              f"transfer tail {profile.transfer_tail_ms:.1f} ms, overhead {profile.overhead_ms:.1f} ms")
        return 0
    profile = _load_profile(args.profile)
    arrivals = _arrivals(args)
    cpi = profile.cores_per_instance
    if args.plan_command == "simulate":
        prefill, decode = args.topology
        topology = Topology(prefill, decode, args.prefill_cores or prefill * cpi, args.decode_cores or decode * cpi,
                            args.max_batch_size)
        summary = summarize(simulate(profile, topology, arrivals))
        print("\n".join([*_HEADER, _row(topology.label, summary)]))
        if args.json:
            args.json.write_text(json.dumps({"topology": topology.label, **summary}, indent=1))
        return 0
    rows, best = [], None
    for total in range(2, args.max_instances + 1):  # the fewest instances first
        candidates = [Topology(p, total - p, p * cpi, (total - p) * cpi, args.max_batch_size) for p in range(1, total)]
        candidates.append(Topology(0, total, 0, total * cpi, args.max_batch_size))
        for topology in candidates:
            summary = summarize(simulate(profile, topology, arrivals))
            rows.append({"topology": topology.label, "instances": total,
                         "meets": _meets(summary, args.ttft_ms, args.tpot_ms), **summary})
        meeting = [r for r in rows if r["instances"] == total and r["meets"]]
        if meeting:
            best = min(meeting, key=lambda r: r["tpot_ms"]["p99"] or 0)
            break
    print("\n".join([*_HEADER, *(_row(r["topology"] + (" (meets)" if r["meets"] else ""), r) for r in rows)]))
    if best:
        print(f"pdserve plan: {best['topology']}: the fewest instances ({best['instances']}) that meet p99 TTFT <= "
              f"{args.ttft_ms:g} ms and p99 TPOT <= {args.tpot_ms:g} ms on this trace (lowest p99 TPOT among them)")
    else:
        print(f"pdserve plan: nothing up to {args.max_instances} instances meets the objectives", file=sys.stderr)
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "best": best}, indent=1))
    return 0 if best else 1


COMMAND = Command("plan", "profile a stack, simulate arrival traces, recommend prefill and decode instance counts",
                  _add_arguments, _run)
