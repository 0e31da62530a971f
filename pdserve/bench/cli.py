"""`pdserve bench` flags. Kept light: the harness itself (torch, grpc, matplotlib) loads only when it runs."""

import argparse
import os
import sys
from pathlib import Path

from common.basics.config import KV_DTYPES, WEIGHT_FORMAT_NAMES, default_certs_dir
from pdserve.affinity import cpus_arg
from pdserve.command import Command
from pdserve.distill.cli import default_draft_dir

PEER_NAMES = ("hf-static", "pdserve-colocated", "pdserve-unified", "pdserve", "pdserve-fp16", "pdserve-bf16",
              "pdserve-spec", "pdserve-draft",
              "pdserve-no-prefix-cache", "pdserve-no-local-prefill", "pdserve-upfront", "pdserve-nixl", "pdserve-1p2d",
              "pdserve-2p1d", "llama.cpp", "llama-server")
WORKLOAD_NAMES = ("chat", "long", "mixed", "batch1", "extractive", "open-chat", "long-budget", "multi-turn-chat",
                  "document-qa", "smoke")


def _float_list(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not values or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive numbers, got {text!r}")
    return values


def _peer_list(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in PEER_NAMES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown peer(s) {unknown}; choose from {', '.join(PEER_NAMES)}")
    return names


def _workload_list(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in WORKLOAD_NAMES]
    if unknown or not names or len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(f"expected distinct workloads from {', '.join(WORKLOAD_NAMES)}, got {text!r}")
    return names


def add_bench_arguments(bench: argparse.ArgumentParser, model_dir: Path) -> None:
    bench.add_argument("--model", type=Path, default=model_dir, help="checkpoint the peers serve")
    target = bench.add_mutually_exclusive_group(required=True)
    target.add_argument("--address", help="benchmark a running gateway at host:port")
    target.add_argument("--peers", type=_peer_list, help=f"start and benchmark these, in order: {','.join(PEER_NAMES)}")
    bench.add_argument("--name", default="target", help="run name for --address")
    bench.add_argument("--stats-address", help="decode tier host:port to sample Stats from (with --address)")
    bench.add_argument("--certs-dir", type=Path,
                       default=default_certs_dir(os.environ.get("XDG_CACHE_HOME"), os.path.expanduser("~")),
                       help="the tiers' mutual-TLS certificates (as `pdserve up --certs-dir`): the peers' stacks use "
                            "them, and the decode tier's Stats are read with the gateway's (default: %(default)s)")
    bench.add_argument("--workload", type=_workload_list, default=["mixed"], metavar="NAME[,NAME...]",
                       help=f"one or more of {', '.join(WORKLOAD_NAMES)}: every load runs each, in this order")
    bench.add_argument("--num-requests", type=int, default=40)
    bench.add_argument("--seed", type=int, default=0)
    bench.add_argument("--rates", type=_float_list, default=[], help="open loop: Poisson rates, req/s, e.g. 0.5,1")
    bench.add_argument("--concurrency", type=lambda t: [int(v) for v in _float_list(t)], default=[],
                       help="closed loop: client counts, e.g. 1,8")
    bench.add_argument("--max-duration-s", type=float, default=180.0, help="hard cap of each run")
    bench.add_argument("--retry-refused", action="store_true",
                       help="send a request the server refuses for room (RESOURCE_EXHAUSTED) again after the delay it "
                            "asks for, instead of counting it failed; its latency counts from the first attempt")
    bench.add_argument("--warmup", type=int, default=2, help="unmeasured requests before a target's runs")
    bench.add_argument("--batch1-probe", type=int, default=0, help="requests of a one-client batch-1 probe run")
    bench.add_argument("--slo-ttft-ms", type=float, default=2000.0, help="goodput objective for TTFT")
    bench.add_argument("--slo-tpot-ms", type=float, default=200.0, help="goodput objective for TPOT")
    bench.add_argument("--prefill-cpus", type=cpus_arg, metavar="LIST", help="cores of pdserve's prefill tier")
    bench.add_argument("--decode-cpus", type=cpus_arg, metavar="LIST",
                       help="cores of pdserve's decode tier; single-process peers get prefill + decode cores")
    bench.add_argument("--gateway-cpus", type=cpus_arg, metavar="LIST", help="cores of the pdserve gateways")
    bench.add_argument("--max-batch-size", type=int, default=32, help="decode batch limit of every peer")
    bench.add_argument("--pdserve-weights", default="fp32", choices=WEIGHT_FORMAT_NAMES, metavar="FORMAT",
                       help="weight format of both tiers of every pdserve peer (pdserve-fp16 is always fp16)")
    bench.add_argument("--kv-blocks", type=int, default=0, metavar="N",
                       help="KV pool of every pdserve peer's tiers, in blocks (`pdserve up --kv-blocks`): the same "
                            "pool for pdserve and pdserve-upfront; 0: each tier's --kv-memory-mb default")
    bench.add_argument("--kv-dtype", default="float32", choices=sorted(KV_DTYPES), metavar="DTYPE",
                       help="KV cache dtype of every pdserve peer (`pdserve up --kv-dtype`)")
    bench.add_argument("--llama-server-slots", type=int, default=16, metavar="N",
                       help="llama-server's --parallel: the sequences it batches (its context is sized per slot "
                            "for the longest request)")
    bench.add_argument("--max-new-tokens", type=int, metavar="N",
                       help="every request's max_new_tokens, replacing the workload's")
    bench.add_argument("--draft-model", type=Path, default=default_draft_dir(model_dir),
                       help="pdserve-draft's draft checkpoint (default: `pdserve distill-draft`'s output)")
    bench.add_argument("--fixed-k", action="store_true",
                       help="speculating peers always propose 4 tokens (no adaptive k): measures acceptance, not speed")
    bench.add_argument("--no-roofline", dest="roofline", action="store_false", help="skip the micro-benchmarks")
    bench.add_argument("--no-progress", action="store_true", help="no progress bar")
    bench.add_argument("--out", type=Path, help="output directory (default bench-results/<time>)")


def run_bench(args, default_model: Path) -> int:
    from pdserve.bench.runner import execute

    if args.num_requests < 1 or args.max_duration_s <= 0:
        print("pdserve bench: --num-requests must be >= 1 and --max-duration-s > 0", file=sys.stderr)
        return 2
    if args.kv_blocks < 0 or (args.max_new_tokens is not None and args.max_new_tokens < 1) or \
            args.llama_server_slots < 1:
        print("pdserve bench: --kv-blocks must be >= 0, --max-new-tokens and --llama-server-slots >= 1",
              file=sys.stderr)
        return 2
    if args.peers and args.model == default_model:
        from pdserve.prepare.default_model import prepare_default_model

        prepare_default_model(default_model)
    args.command_line = " ".join(["pdserve", *sys.argv[1:]]) if sys.argv[1:2] == ["bench"] else "pdserve bench"
    summary = execute(args)
    failed = sum(r["num_failed"] for r in summary["runs"])
    return 1 if not summary["runs"] or failed == sum(r["num_requests"] for r in summary["runs"]) else 0


COMMAND = Command("bench", "load-test a gateway, or start and compare the peers side by side", add_bench_arguments,
                  run_bench)
