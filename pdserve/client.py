"""`pdserve generate`: a small gRPC client that streams a completion to the terminal."""

import argparse
import os
import sys
from pathlib import Path

import grpc

from common.basics.config import DEFAULT_GATEWAY_PORT
from pdserve.command import Command
from pdserve.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc


def build_request(args) -> gateway_pb2.GenerateRequest:
    sampling = common_pb2.SamplingParams()
    for name in ("temperature", "top_p", "top_k", "seed"):
        value = getattr(args, name)
        if value is not None:
            setattr(sampling, name, value)
    request = gateway_pb2.GenerateRequest(sampling=sampling, stop=args.stop)
    if args.chat:
        request.messages.messages.add(role="user", content=args.prompt)
    else:
        request.prompt = args.prompt
    if args.max_new_tokens is not None:
        request.max_new_tokens = args.max_new_tokens
    return request


def gateway_channel(address: str, tls_ca: Path | None) -> grpc.Channel:
    """Plaintext, or TLS verifying the gateway's certificate against tls_ca."""
    if tls_ca is None:
        return grpc.insecure_channel(address)
    return grpc.secure_channel(address, grpc.ssl_channel_credentials(root_certificates=tls_ca.read_bytes()))


def stream_to_terminal(args) -> int:
    metadata = [("authorization", f"Bearer {args.api_key}")] if args.api_key else []
    with gateway_channel(args.address, args.tls_ca) as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)
        try:
            for reply in stub.Generate(build_request(args), timeout=args.timeout_s, metadata=metadata):
                sys.stdout.write(reply.text)
                sys.stdout.flush()
                if reply.finish_reason:
                    reason = common_pb2.FinishReason.Name(reply.finish_reason)
                    t = reply.timings
                    print(f"\n[{reason}; {reply.usage.prompt_tokens} prompt + {reply.usage.completion_tokens} "
                          f"completion tokens; TTFT {t.time_to_first_token_ms:.0f} ms, total {t.total_ms:.0f} ms]",
                          file=sys.stderr)
        except grpc.RpcError as error:
            print(f"\npdserve generate: {error.code().name}: {error.details()}", file=sys.stderr)
            return 1
    return 0


def _add_arguments(generate: argparse.ArgumentParser, _model_dir: Path) -> None:
    generate.add_argument("prompt")
    generate.add_argument("--address", default=f"127.0.0.1:{DEFAULT_GATEWAY_PORT}")
    generate.add_argument("--chat", action="store_true", help="send the prompt as a user chat turn")
    for flag, kind in (("--max-new-tokens", int), ("--temperature", float), ("--top-p", float), ("--top-k", int),
                       ("--seed", int)):
        generate.add_argument(flag, type=kind)
    generate.add_argument("--stop", action="append", default=[])
    generate.add_argument("--timeout-s", type=float, default=300.0)
    generate.add_argument("--api-key", default=os.environ.get("PDSERVE_API_KEY"),
                          help="sent as `authorization: Bearer KEY` (default: $PDSERVE_API_KEY)")
    generate.add_argument("--tls-ca", type=Path, help="the gateway serves TLS: verify its certificate with this CA")


GENERATE = Command("generate", "stream a completion from a running gateway to the terminal", _add_arguments,
                   lambda args, _: stream_to_terminal(args))
