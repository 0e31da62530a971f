"""`pdserve up`: the disaggregated topology as local processes (decode, prefill, gateway), the same
commands compose.yaml runs in containers. Waits until every tier reports SERVING, prints how to call
the gateway, and on Ctrl-C / SIGTERM (or a tier dying) stops them all."""

import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from common.edge.server import is_serving
from common.edge.telemetry import METRICS_PORT_OFFSETS
from pdserve.affinity import pin_to
from pdserve.prepare.default_model import prepare_default_model

_START_TIMEOUT_S = 180.0
_STOP_TIMEOUT_S = 10.0


def free_port(host: str) -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def tier_commands(args, prefill_port: int, decode_port: int) -> dict[str, list[str]]:
    base = [sys.executable, "-m", "pdserve.cli"]
    model = ["--model", str(args.model), "--host", args.host]
    kv = ["--block-size", str(args.block_size), "--kv-dtype", args.kv_dtype, "--device", args.device,
          "--cpu-weight-layout", args.cpu_weight_layout]
    gateway = [*base, "gateway", *model, "--port", str(args.port),
               "--prefill", f"{args.host}:{prefill_port}", "--decode", f"{args.host}:{decode_port}",
               "--max-new-tokens-limit", str(args.max_new_tokens_limit)]
    if getattr(args, "colocated", False):
        if args.prefill_weights != args.decode_weights:
            raise ValueError(f"--colocated holds one copy of the weights for both engines: --prefill-weights "
                             f"{args.prefill_weights} and --decode-weights {args.decode_weights} must be the same")
        return {"colocated": [*base, "colocated", *model, "--port", str(prefill_port), "--decode-port",
                              str(decode_port), *kv, "--weights", args.decode_weights,
                              "--prefill-kv-memory-mb", str(args.prefill_kv_memory_mb),
                              "--decode-kv-memory-mb", str(args.decode_kv_memory_mb), "--chunk-size",
                              str(args.chunk_size), "--max-batch-tokens", str(args.max_batch_tokens),
                              "--max-batch-size", str(args.max_batch_size), "--threads", str(args.decode_threads),
                              *speculation_flags(args)],
                "gateway": gateway}
    return {
        "decode": [*base, "decode", *model, "--port", str(decode_port), *kv,
                   "--kv-memory-mb", str(args.decode_kv_memory_mb), "--max-batch-size", str(args.max_batch_size),
                   "--threads", str(args.decode_threads), "--weights", args.decode_weights,
                   *speculation_flags(args)],
        "prefill": [*base, "prefill", *model, "--port", str(prefill_port), *kv,
                    "--kv-memory-mb", str(args.prefill_kv_memory_mb), "--chunk-size", str(args.chunk_size),
                    "--max-batch-tokens", str(args.max_batch_tokens), "--threads", str(args.prefill_threads),
                    "--weights", args.prefill_weights],
        "gateway": gateway,
    }


def speculation_flags(args) -> list[str]:
    """`pdserve up`'s speculation flags, passed on to the process that runs the decode engine."""
    flags = ["--speculative", args.speculative, "--num-speculative-tokens", str(args.num_speculative_tokens),
             "--speculative-max-batch", str(args.speculative_max_batch)]
    flags += ["--draft-model", str(args.draft_model)] if args.draft_model else []
    return flags + (["--speculative-fixed-k"] if args.speculative_fixed_k else [])


def run_stack(args, default_model: Path) -> int:
    if args.model == default_model:
        prepare_default_model(default_model)
    prefill_port = args.prefill_port or free_port(args.host)
    decode_port = args.decode_port or free_port(args.host)
    addresses = {"decode": f"{args.host}:{decode_port}", "prefill": f"{args.host}:{prefill_port}",
                 "gateway": f"{args.host}:{args.port}", "colocated": f"{args.host}:{prefill_port}"}
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    procs: dict[str, subprocess.Popen] = {}
    try:
        for name, command in tier_commands(args, prefill_port, decode_port).items():
            procs[name] = subprocess.Popen([*command, *metrics_flags(args, name)],
                                           preexec_fn=pin_to(getattr(args, f"{name}_cpus", None)))
        if not _wait_serving(procs, addresses, stop):
            return 1
        _print_banner(addresses, args.model)
        _print_metrics(args, [tier for tier in METRICS_PORT_OFFSETS if tier in procs])
        while not stop.wait(0.5):
            dead = [name for name, proc in procs.items() if proc.poll() is not None]
            if dead:
                print(f"pdserve up: the {', '.join(dead)} tier exited; stopping the stack", file=sys.stderr)
                return 1
        return 0
    finally:
        _stop_all(procs)


def metrics_port(args, tier: str) -> int:
    """The tier's Prometheus port: --metrics-port BASE plus the tier's offset; 0 (off) stays 0."""
    return args.metrics_port + METRICS_PORT_OFFSETS[tier] if args.metrics_port else 0


def metrics_flags(args, tier: str) -> list[str]:
    return ["--metrics-port", str(metrics_port(args, tier))] if tier in METRICS_PORT_OFFSETS else []


def _print_metrics(args, tiers: list[str]) -> None:
    if not args.metrics_port:
        print("Metrics are off (--metrics-port 0).\n", flush=True)
        return
    lines = "".join(f"  {tier:<8} http://{args.host}:{metrics_port(args, tier)}/metrics\n" for tier in tiers)
    print(f"Prometheus metrics:\n{lines}", flush=True)


def _wait_serving(procs: dict[str, subprocess.Popen], addresses: dict[str, str], stop: threading.Event) -> bool:
    deadline = time.monotonic() + _START_TIMEOUT_S
    pending = set(procs)
    while pending and not stop.is_set():
        for name in sorted(pending):
            if procs[name].poll() is not None:
                print(f"pdserve up: the {name} tier exited with code {procs[name].returncode} while starting",
                      file=sys.stderr)
                return False
            if is_serving(addresses[name]):
                pending.discard(name)
        if time.monotonic() > deadline:
            print(f"pdserve up: {', '.join(sorted(pending))} not serving after {_START_TIMEOUT_S:.0f} s", file=sys.stderr)
            return False
        time.sleep(0.2)
    return not pending


def _print_banner(addresses: dict[str, str], model: Path) -> None:
    gateway = addresses["gateway"]
    print(
        f"\npdserve is serving {model.name}\n"
        f"  gateway  {gateway}   (pdserve.v1.Gateway/Generate, health, reflection)\n"
        f"  prefill  {addresses['prefill']}\n"
        f"  decode   {addresses['decode']}\n\n"
        "Call it:\n"
        f"  .venv/bin/pdserve generate --address {gateway} \"The capital of France is\"\n"
        f"  .venv/bin/pdserve generate --address {gateway} --chat \"Write a haiku about GPUs\"\n"
        f"  grpcurl -plaintext -d '{{\"prompt\": \"Hello\", \"max_new_tokens\": 16}}' {gateway} pdserve.v1.Gateway/Generate\n"
        "Stop with Ctrl-C.\n",
        flush=True,
    )


def _stop_all(procs: dict[str, subprocess.Popen]) -> None:
    for proc in procs.values():
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + _STOP_TIMEOUT_S
    for proc in procs.values():
        try:
            proc.wait(timeout=max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
