"""`pdserve generate`: streams a completion from a running gateway to the terminal (through pdserve.client)."""

import argparse
import os
import sys
from pathlib import Path

import grpc

from common.basics.config import DEFAULT_GATEWAY_PORT
from pdserve.client import Client
from pdserve.command import Command


def stream_to_terminal(args) -> int:
    fields = {name: getattr(args, name) for name in ("max_new_tokens", "temperature", "top_p", "top_k", "seed")}
    text = {"messages": [("user", args.prompt)]} if args.chat else {"prompt": args.prompt}
    with Client(args.address, api_key=args.api_key, tls_ca=args.tls_ca, timeout_s=args.timeout_s) as client:
        try:
            for chunk in client.generate(**text, stop=args.stop, **fields):
                sys.stdout.write(chunk.text)
                sys.stdout.flush()
                if chunk.finish_reason:
                    t = chunk.timings
                    print(f"\n[{chunk.finish_reason}; {chunk.usage.prompt_tokens} prompt + "
                          f"{chunk.usage.completion_tokens} completion tokens; TTFT {t.time_to_first_token_ms:.0f} ms, "
                          f"total {t.total_ms:.0f} ms]", file=sys.stderr)
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
    generate.add_argument("--timeout-s", type=float, default=300.0,
                          help="deadline of the whole call, retries of a request turned away included")
    generate.add_argument("--api-key", default=os.environ.get("PDSERVE_API_KEY"),
                          help="sent as `authorization: Bearer KEY` (default: $PDSERVE_API_KEY)")
    generate.add_argument("--tls-ca", type=Path, help="the gateway serves TLS: verify its certificate with this CA")


GENERATE = Command("generate", "stream a completion from a running gateway to the terminal", _add_arguments,
                   lambda args, _: stream_to_terminal(args))
