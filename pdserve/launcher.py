"""`pdserve up`: the disaggregated topology as local processes (decode, prefill, gateway), the same
commands compose.yaml runs in containers. Waits until every tier reports SERVING, prints how to call
the gateway, and on Ctrl-C / SIGTERM (or a tier dying) stops them all."""

import argparse
import os
import signal
import socket
import sys
from dataclasses import dataclass
from pathlib import Path

from common.basics.config import (
    DEFAULT_DRAIN_TIMEOUT_S,
    DEFAULT_HTTP_PORT,
    DecodeConfig,
    GatewayConfig,
    PrefillConfig,
    default_certs_dir,
)
from common.edge.server import Tls
from common.edge.telemetry import DEFAULT_METRICS_PORT, METRICS_PORT_OFFSETS
from pdserve.affinity import cpus_arg, pin_to
from pdserve.certs import CertFiles, ensure_certs
from pdserve.command import Command
from pdserve.flags import add_flags, field_values, to_argv
from pdserve.supervisor import Instance, Supervisor
from pdserve.tier_commands import DECODE_FIELDS, PREFILL_FIELDS, SHARED_FIELDS

_START_TIMEOUT_S = 180.0
_STOP_GRACE_S = 5.0  # past the tiers' drain timeout, before SIGKILL


def free_port(host: str) -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


# `pdserve up` flags: one copy of what both model tiers share, one per tier of what each sets on its own.
UP_SHARED = ("block_size", "kv_dtype", "kv_transport", "device", "cpu_weight_layout", "kv_blocks", "prefix_caching")
UP_PER_TIER = ("weights", "kv_memory_mb", "threads", "port")
UP_GATEWAY = ("local_prefill_tokens", "prefix_weight", "cache_poll_ms", "default_max_new_tokens",
              "max_new_tokens_limit", "max_stop_strings", "max_logprobs", "max_completions", "admission_factor", "api_keys_file", "public_tls_cert",
              "public_tls_key")


def add_up_arguments(up: argparse.ArgumentParser, model_dir: Path) -> None:
    add_flags(up, GatewayConfig, ("model_dir", "host", "port", "http_port"),
              defaults={"model_dir": model_dir, "http_port": DEFAULT_HTTP_PORT})
    add_flags(up, PrefillConfig, (*UP_SHARED, *PREFILL_FIELDS))
    for cls, tier in ((PrefillConfig, "prefill"), (DecodeConfig, "decode")):
        add_flags(up, cls, UP_PER_TIER, prefix=f"{tier}-", whose=f"the {tier} tier")
    add_flags(up, DecodeConfig, DECODE_FIELDS)
    add_flags(up, GatewayConfig, UP_GATEWAY)
    up.add_argument("--metrics-port", type=int, default=DEFAULT_METRICS_PORT, metavar="BASE",
                    help="Prometheus ports: gateway BASE, prefill BASE+1, decode BASE+2 (0 turns metrics off)")
    up.add_argument("--certs-dir", type=Path,
                    help="the CA and per-tier certificates for mutual TLS between the tiers, made there when missing "
                         f"(default {default_certs_dir(os.environ.get('XDG_CACHE_HOME'), os.path.expanduser('~'))})")
    up.add_argument("--insecure", action="store_true",
                    help="plaintext between the tiers (no mutual TLS): only for debugging on a trusted host")
    up.add_argument("--prefill-replicas", type=int, default=1, help="prefill instances (ports from --prefill-port)")
    up.add_argument("--decode-replicas", type=int, default=1, help="decode instances (ports from --decode-port)")
    up.add_argument("--drain-timeout-s", type=float, default=DEFAULT_DRAIN_TIMEOUT_S,
                    help="on stop, how long each tier lets requests in flight finish")
    up.add_argument("--colocated", action="store_true",
                    help="prefill and decode engines in one process over one copy of the weights (the baseline)")
    for tier in ("prefill", "decode", "gateway", "colocated"):
        up.add_argument(f"--{tier}-cpus", type=cpus_arg, metavar="LIST",
                        help=f"pin the {tier} process to these cores, e.g. 0, 0-1 or 0,2 (default: no pinning)")


def tls_fields(certs: CertFiles | None, tier: str) -> dict:
    """A tier's --tls-cert/--tls-key/--tls-ca from the certificates `pdserve up` made (none: plaintext)."""
    if certs is None:
        return {}
    cert, key = certs.for_tier(tier)
    return {"tls_cert": cert, "tls_key": key, "tls_ca": certs.ca}


@dataclass(frozen=True)
class StackConfigs:
    prefill: list[PrefillConfig]  # one per replica
    decode: list[DecodeConfig]
    gateway: GatewayConfig


def stack_configs(args, prefill_ports: list[int], decode_ports: list[int],
                  certs: CertFiles | None = None) -> StackConfigs:
    """Each instance's configuration from `pdserve up` flags, on the ports given (one per replica), with mutual
    TLS when certs. Every prefill instance may push to every decode instance; the gateway knows them all."""
    common = {"model_dir": args.model, "host": args.host, **field_values(PrefillConfig, args, UP_SHARED)}
    per_tier = {tier: field_values(cls, args, UP_PER_TIER, prefix=f"{tier}-")
                for cls, tier in ((PrefillConfig, "prefill"), (DecodeConfig, "decode"))}
    prefill_addresses = tuple(f"{args.host}:{port}" for port in prefill_ports)
    decode_addresses = tuple(f"{args.host}:{port}" for port in decode_ports)
    prefill = [PrefillConfig(**common, **{**per_tier["prefill"], "port": port}, decode_addresses=decode_addresses,
                             **tls_fields(certs, "prefill"), **field_values(PrefillConfig, args, PREFILL_FIELDS))
               for port in prefill_ports]
    decode = [DecodeConfig(**common, **{**per_tier["decode"], "port": port}, **tls_fields(certs, "decode"),
                           **field_values(DecodeConfig, args, DECODE_FIELDS)) for port in decode_ports]
    gateway = GatewayConfig(model_dir=args.model, host=args.host, port=args.port, http_port=args.http_port,
                            lease_ms=decode[0].lease_ms,
                            prefill_addresses=prefill_addresses, decode_addresses=decode_addresses,
                            **tls_fields(certs, "gateway"), **field_values(GatewayConfig, args, UP_GATEWAY))
    return StackConfigs(prefill, decode, gateway)


def tier_commands(args, prefill_ports: list[int], decode_ports: list[int],
                  certs: CertFiles | None = None) -> dict[str, list[str]]:
    """The command line of each process `pdserve up` starts ("prefill-0", "decode-0", ..., "gateway"), written from
    each instance's configuration; a colocated stack has one "colocated" process instead."""
    base = [sys.executable, "-m", "pdserve.cli"]
    configs = stack_configs(args, prefill_ports, decode_ports, certs)
    commands = {"gateway": [*base, "gateway", *to_argv(configs.gateway)]}
    if not getattr(args, "colocated", False):
        return {**{f"decode-{i}": [*base, "decode", *to_argv(c)] for i, c in enumerate(configs.decode)},
                **{f"prefill-{i}": [*base, "prefill", *to_argv(c)] for i, c in enumerate(configs.prefill)},
                **commands}
    prefill, decode = configs.prefill[0], configs.decode[0]
    if len(configs.prefill) > 1 or len(configs.decode) > 1:
        raise ValueError("--colocated runs one process holding both engines: replicas are for separate tiers")
    if prefill.weights != decode.weights:
        raise ValueError(f"--colocated holds one copy of the weights for both engines: --prefill-weights "
                         f"{prefill.weights} and --decode-weights {decode.weights} must be the same")
    colocated = [*base, "colocated", *to_argv(prefill, (*SHARED_FIELDS, *PREFILL_FIELDS, "port")),
                 *to_argv(decode, ["port"], prefix="decode-"), *to_argv(decode, DECODE_FIELDS),
                 *to_argv(prefill, ["kv_memory_mb"], prefix="prefill-"),
                 *to_argv(decode, ["kv_memory_mb"], prefix="decode-")]
    return {"colocated": colocated, **commands}


def _ports(base: int, count: int, host: str) -> list[int]:
    """count ports from base (base, base+1, ...), or free ones when base is 0."""
    return [base + i for i in range(count)] if base else [free_port(host) for _ in range(count)]


def run_stack(args, default_model: Path) -> int:
    if args.model == default_model:
        from pdserve.prepare.default_model import prepare_default_model

        prepare_default_model(default_model)
    certs = None if args.insecure else ensure_certs(
        args.certs_dir or default_certs_dir(os.environ.get("XDG_CACHE_HOME"), os.path.expanduser("~")),
        hosts=tuple(dict.fromkeys(("localhost", "127.0.0.1", args.host))))
    # the supervisor checks the internal tiers' health as the gateway does: with the gateway's identity
    identity = Tls.from_files(*certs.for_tier("gateway"), certs.ca) if certs else None
    prefill_ports = _ports(args.prefill_port, args.prefill_replicas, args.host)
    decode_ports = _ports(args.decode_port, args.decode_replicas, args.host)
    supervisor = Supervisor(_instances(args, prefill_ports, decode_ports, certs, identity), pin_to)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: supervisor.stop_requested.set())
    try:
        supervisor.start_all()
        if not supervisor.wait_serving(_START_TIMEOUT_S):
            return 1
        _print_banner(supervisor.instances, args.model, certs, args.api_keys_file, args.http_port)
        _print_metrics(args, supervisor.instances)
        supervisor.watch()
        return 0
    finally:
        supervisor.stop_all(args.drain_timeout_s + _STOP_GRACE_S)


def _instances(args, prefill_ports: list[int], decode_ports: list[int], certs: CertFiles | None,
               identity: Tls | None) -> list[Instance]:
    host = args.host
    addresses = {"gateway": f"{host}:{args.port}", "colocated": f"{host}:{prefill_ports[0]}"}
    addresses |= {f"prefill-{i}": f"{host}:{port}" for i, port in enumerate(prefill_ports)}
    addresses |= {f"decode-{i}": f"{host}:{port}" for i, port in enumerate(decode_ports)}
    return [Instance(name, [*command, *metrics_flags(args, name), "--drain-timeout-s", str(args.drain_timeout_s)],
                     addresses[name], None if name == "gateway" else identity,
                     getattr(args, f"{tier_of(name)}_cpus", None))
            for name, command in tier_commands(args, prefill_ports, decode_ports, certs).items()]


def tier_of(instance: str) -> str:
    """ "decode-1" -> "decode" """
    return instance.split("-")[0]


def metrics_port(args, instance: str) -> int:
    """An instance's Prometheus port: --metrics-port BASE plus its tier's offset (replica i > 0 adds 3 i, past
    every replica-0 port); 0 (off) stays 0."""
    if not args.metrics_port:
        return 0
    replica = int(instance.rsplit("-", 1)[1]) if "-" in instance else 0
    return args.metrics_port + METRICS_PORT_OFFSETS[tier_of(instance)] + 3 * replica


def metrics_flags(args, instance: str) -> list[str]:
    return ["--metrics-port", str(metrics_port(args, instance))] if tier_of(instance) in METRICS_PORT_OFFSETS else []


def _print_metrics(args, instances: list[Instance]) -> None:
    if not args.metrics_port:
        print("Metrics are off (--metrics-port 0).\n", flush=True)
        return
    lines = "".join(f"  {i.name:<10} http://{args.host}:{metrics_port(args, i.name)}/metrics\n"
                    for i in instances if tier_of(i.name) in METRICS_PORT_OFFSETS)
    print(f"Prometheus metrics:\n{lines}", flush=True)


def _print_banner(instances: list[Instance], model: Path, certs: CertFiles | None, api_keys_file: Path | None,
                  http_port: int | None = None) -> None:
    gateway = next(i.address for i in instances if i.name == "gateway")
    tiers = "".join(f"  {i.name:<10} {i.address}\n" for i in instances if i.name != "gateway")
    between = (f"mutual TLS, certificates in {certs.ca.parent}" if certs
               else "plaintext (--insecure): anyone who reaches their ports can call them")
    key, key_header = "", ""
    if api_keys_file is not None:  # callers need a key made by `pdserve keys --file` for this file
        key, key_header = " --api-key $PDSERVE_API_KEY", " -H \"authorization: Bearer $PDSERVE_API_KEY\""
    print(
        f"\npdserve is serving {model.name}\n"
        f"  gateway    {gateway}   (pdserve.v1.Gateway/Generate, health, reflection)\n"
        + (f"  HTTP       http://{gateway.rsplit(':', 1)[0]}:{http_port}/v1   (OpenAI-compatible)\n" if http_port else "")
        + f"{tiers}"
        f"Between the tiers: {between}.\n"
        + (f"API keys from {api_keys_file}: send `authorization: Bearer KEY`.\n" if api_keys_file else "")
        + "\nCall it:\n"
        f"  .venv/bin/pdserve generate --address {gateway}{key} \"The capital of France is\"\n"
        f"  .venv/bin/pdserve generate --address {gateway}{key} --chat \"Write a haiku about GPUs\"\n"
        f"  grpcurl -plaintext{key_header} -d '{{\"prompt\": \"Hello\", \"max_new_tokens\": 16}}' {gateway} "
        "pdserve.v1.Gateway/Generate\n"
        "Tiers that die are started again; stop with Ctrl-C.\n",
        flush=True,
    )


UP = Command("up", "run gateway + prefill + decode as local processes", add_up_arguments, run_stack)
