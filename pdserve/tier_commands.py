"""`pdserve gateway | prefill | decode | colocated`: one tier (or both engines in one process) in the
foreground until SIGINT / SIGTERM. Flags come from the configuration dataclasses (pdserve/flags.py)."""

import argparse
import os
from pathlib import Path

from common.basics.config import (
    DEFAULT_DRAIN_TIMEOUT_S,
    DEFAULT_PORTS,
    DecodeConfig,
    GatewayConfig,
    PrefillConfig,
    TierConfig,
)
from common.edge.telemetry import DEFAULT_METRICS_PORT, METRICS_PORT_OFFSETS
from pdserve.command import Command
from pdserve.flags import add_flags, config_from_args, field_values

# A colocated process holds one copy of the weights and one listening address for both engines; each engine
# keeps its own KV pool and tier-specific settings.
SHARED_FIELDS = tuple(f for f in TierConfig.__dataclass_fields__ if f not in ("kv_memory_mb", "port"))
PREFILL_FIELDS = ("chunk_size", "max_batch_tokens", "max_queued_prompts")
DECODE_FIELDS = tuple(f for f in DecodeConfig.__dataclass_fields__ if f not in TierConfig.__dataclass_fields__)


def _metrics_arg(parser: argparse.ArgumentParser, tier: str) -> None:
    port = DEFAULT_METRICS_PORT + METRICS_PORT_OFFSETS[tier]
    parser.add_argument("--metrics-port", type=int, default=port,
                        help=f"Prometheus /metrics port on --host (default {port}; 0 turns metrics off)")


def _fidelity_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--fidelity-max-ppl-increase", type=float, metavar="FRACTION",
                        help="refuse to start if --weights raises perplexity on evals/ by more than this vs fp32")
    parser.add_argument("--fidelity-min-agreement", type=float, metavar="FRACTION",
                        help="refuse to start if --weights agrees with fp32's next token less often than this")


def _drain_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--drain-timeout-s", type=float, default=DEFAULT_DRAIN_TIMEOUT_S,
                        help="on SIGTERM: report NOT_SERVING, take no new work, and let what is in flight finish "
                             "for up to this long before exiting (default %(default)s)")


def _tier_arguments(cls: type, tier: str):
    def add_arguments(parser: argparse.ArgumentParser, model_dir: Path) -> None:
        add_flags(parser, cls, defaults={"model_dir": model_dir, "port": DEFAULT_PORTS[tier]})
        if cls is not GatewayConfig:
            _fidelity_args(parser)
        _metrics_arg(parser, tier)
        _drain_arg(parser)
    return add_arguments


def _add_colocated_arguments(parser: argparse.ArgumentParser, model_dir: Path) -> None:
    add_flags(parser, PrefillConfig, (*SHARED_FIELDS, *PREFILL_FIELDS), defaults={"model_dir": model_dir})
    add_flags(parser, PrefillConfig, ["port"], defaults={"port": DEFAULT_PORTS["prefill"]},
              whose="the prefill service's port")
    add_flags(parser, DecodeConfig, ["port"], prefix="decode-", whose="the decode service's port (0: --port)")
    for cls, prefix in ((PrefillConfig, "prefill-"), (DecodeConfig, "decode-")):
        add_flags(parser, cls, ["kv_memory_mb"], prefix=prefix, whose=f"the {prefix[:-1]} engine")
    add_flags(parser, DecodeConfig, DECODE_FIELDS)
    _drain_arg(parser)


def colocated_configs(args: argparse.Namespace) -> tuple[PrefillConfig, DecodeConfig]:
    """The two engines' configurations from `pdserve colocated` flags."""
    shared = field_values(PrefillConfig, args, SHARED_FIELDS)
    # the decode engine beside it is the one decode instance its prefill engine pushes to
    prefill = PrefillConfig(**shared, port=args.port, kv_memory_mb=args.prefill_kv_memory_mb,
                            decode_addresses=(f"{args.host}:{args.decode_port or args.port}",),
                            **field_values(PrefillConfig, args, PREFILL_FIELDS))
    decode = DecodeConfig(**shared, port=args.decode_port, kv_memory_mb=args.decode_kv_memory_mb,
                          **field_values(DecodeConfig, args, DECODE_FIELDS))
    return prefill, decode


def _run_gateway(args, _) -> int:
    from gateway.server import start_gateway

    config = config_from_args(GatewayConfig, args)
    telemetry = _telemetry(args, "gateway")
    return _serve(start_gateway(config, telemetry.registry), "gateway", args.drain_timeout_s, telemetry)


def _run_prefill(args, _) -> int:
    from prefill_svc.server import start_prefill

    _check_fidelity(args)
    telemetry = _telemetry(args, "prefill")
    return _serve(start_prefill(config_from_args(PrefillConfig, args), telemetry.registry), "prefill",
                  args.drain_timeout_s, telemetry)


def _run_decode(args, _) -> int:
    from decode_svc.server import start_decode

    _check_fidelity(args)
    telemetry = _telemetry(args, "decode")
    return _serve(start_decode(config_from_args(DecodeConfig, args), telemetry.registry), "decode",
                  args.drain_timeout_s, telemetry)


def _run_colocated(args, _) -> int:
    from pdserve.colocated import start_colocated

    return _serve(start_colocated(*colocated_configs(args)), "colocated", args.drain_timeout_s)


def _check_fidelity(args) -> None:
    from common.fidelity.gate import check_startup_fidelity

    check_startup_fidelity(args.model, args.weights, args.fidelity_max_ppl_increase, args.fidelity_min_agreement)


def _telemetry(args, tier: str):
    """Traces (exported when the standard OTEL_* variables name an endpoint) and the metrics endpoint."""
    from common.edge.telemetry import TelemetryConfig, exports_traces, start_telemetry

    return start_telemetry(TelemetryConfig(service_name=f"pdserve-{tier}", metrics_host=args.host,
                                           metrics_port=args.metrics_port, export_traces=exports_traces(os.environ),
                                           gpu_metrics=tier != "gateway"))


def _serve(running, name: str, drain_timeout_s: float, telemetry=None) -> int:
    from common.edge.server import wait_for_signal
    from common.edge.telemetry import exports_traces
    from common.edge.tracing import init_tracing

    init_tracing(f"pdserve-{name}", export=exports_traces(os.environ))  # no-op once telemetry installed one
    print(f"pdserve {name} serving on port {running.port}", flush=True)
    if telemetry is not None and telemetry.metrics_port:
        print(f"pdserve {name} metrics on http://{telemetry.metrics_address}/metrics", flush=True)
    wait_for_signal()
    if not running.drain(drain_timeout_s):
        print(f"pdserve {name}: work still in flight after {drain_timeout_s:.0f} s of draining; ending it",
              flush=True)
    running.stop()
    if telemetry is not None:
        telemetry.stop()
    return 0


GATEWAY = Command("gateway", "run the gateway tier", _tier_arguments(GatewayConfig, "gateway"), _run_gateway)
PREFILL = Command("prefill", "run the prefill tier", _tier_arguments(PrefillConfig, "prefill"), _run_prefill)
DECODE = Command("decode", "run the decode tier", _tier_arguments(DecodeConfig, "decode"), _run_decode)
COLOCATED = Command("colocated", "run prefill and decode in one process (one copy of the weights)",
                    _add_colocated_arguments, _run_colocated)
