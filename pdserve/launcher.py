"""`pdserve up`: the disaggregated topology as local processes (decode, prefill, gateway), the same
commands compose.yaml runs in containers. Waits until every tier reports SERVING, prints how to call
the gateway, and on Ctrl-C / SIGTERM (or a tier dying) stops them all."""

import argparse
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from common.basics.config import DecodeConfig, GatewayConfig, PrefillConfig
from common.edge.server import is_serving
from common.edge.telemetry import DEFAULT_METRICS_PORT, METRICS_PORT_OFFSETS
from pdserve.affinity import cpus_arg, pin_to
from pdserve.command import Command
from pdserve.flags import add_flags, field_values, to_argv
from pdserve.tier_commands import DECODE_FIELDS, PREFILL_FIELDS, SHARED_FIELDS

_START_TIMEOUT_S = 180.0
_STOP_TIMEOUT_S = 10.0


def free_port(host: str) -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


# `pdserve up` flags: one copy of what both model tiers share, one per tier of what each sets on its own.
UP_SHARED = ("block_size", "kv_dtype", "device", "cpu_weight_layout")
UP_PER_TIER = ("weights", "kv_memory_mb", "threads", "port")
UP_GATEWAY = ("default_max_new_tokens", "max_new_tokens_limit", "max_stop_strings")


def add_up_arguments(up: argparse.ArgumentParser, model_dir: Path) -> None:
    add_flags(up, GatewayConfig, ("model_dir", "host", "port"), defaults={"model_dir": model_dir})
    add_flags(up, PrefillConfig, (*UP_SHARED, *PREFILL_FIELDS))
    for cls, tier in ((PrefillConfig, "prefill"), (DecodeConfig, "decode")):
        add_flags(up, cls, UP_PER_TIER, prefix=f"{tier}-", whose=f"the {tier} tier")
    add_flags(up, DecodeConfig, DECODE_FIELDS)
    add_flags(up, GatewayConfig, UP_GATEWAY)
    up.add_argument("--metrics-port", type=int, default=DEFAULT_METRICS_PORT, metavar="BASE",
                    help="Prometheus ports: gateway BASE, prefill BASE+1, decode BASE+2 (0 turns metrics off)")
    up.add_argument("--colocated", action="store_true",
                    help="prefill and decode engines in one process over one copy of the weights (the baseline)")
    for tier in ("prefill", "decode", "gateway", "colocated"):
        up.add_argument(f"--{tier}-cpus", type=cpus_arg, metavar="LIST",
                        help=f"pin the {tier} process to these cores, e.g. 0, 0-1 or 0,2 (default: no pinning)")


def stack_configs(args, prefill_port: int, decode_port: int) -> tuple[PrefillConfig, DecodeConfig, GatewayConfig]:
    """Each tier's configuration from `pdserve up` flags, on the ports given."""
    common = {"model_dir": args.model, "host": args.host, **field_values(PrefillConfig, args, UP_SHARED)}
    per_tier = {tier: field_values(cls, args, UP_PER_TIER, prefix=f"{tier}-")
                for cls, tier in ((PrefillConfig, "prefill"), (DecodeConfig, "decode"))}
    prefill = PrefillConfig(**common, **{**per_tier["prefill"], "port": prefill_port},
                            **field_values(PrefillConfig, args, PREFILL_FIELDS))
    decode = DecodeConfig(**common, **{**per_tier["decode"], "port": decode_port},
                          **field_values(DecodeConfig, args, DECODE_FIELDS))
    gateway = GatewayConfig(model_dir=args.model, host=args.host, port=args.port, lease_ms=decode.lease_ms,
                            prefill_addresses=(f"{args.host}:{prefill_port}",),
                            decode_addresses=(f"{args.host}:{decode_port}",),
                            **field_values(GatewayConfig, args, UP_GATEWAY))
    return prefill, decode, gateway


def tier_commands(args, prefill_port: int, decode_port: int) -> dict[str, list[str]]:
    """The command line of each process `pdserve up` starts, written from each tier's configuration."""
    base = [sys.executable, "-m", "pdserve.cli"]
    prefill, decode, gateway = stack_configs(args, prefill_port, decode_port)
    commands = {"gateway": [*base, "gateway", *to_argv(gateway)]}
    if not getattr(args, "colocated", False):
        return {"decode": [*base, "decode", *to_argv(decode)], "prefill": [*base, "prefill", *to_argv(prefill)],
                **commands}
    if prefill.weights != decode.weights:
        raise ValueError(f"--colocated holds one copy of the weights for both engines: --prefill-weights "
                         f"{prefill.weights} and --decode-weights {decode.weights} must be the same")
    colocated = [*base, "colocated", *to_argv(prefill, (*SHARED_FIELDS, *PREFILL_FIELDS, "port")),
                 *to_argv(decode, ["port"], prefix="decode-"), *to_argv(decode, DECODE_FIELDS),
                 *to_argv(prefill, ["kv_memory_mb"], prefix="prefill-"),
                 *to_argv(decode, ["kv_memory_mb"], prefix="decode-")]
    return {"colocated": colocated, **commands}


def run_stack(args, default_model: Path) -> int:
    if args.model == default_model:
        from pdserve.prepare.default_model import prepare_default_model

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


UP = Command("up", "run gateway + prefill + decode as local processes", add_up_arguments, run_stack)
