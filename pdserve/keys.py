"""`pdserve keys --file PATH --name NAME`: make an API key for the gateway's public edge.

The secret is printed once, alone on stdout (so a script can capture it), and only its hash is appended to the
key file the gateway reads with --api-keys-file (common/edge/auth.py says why a plain SHA-256 is enough for
these secrets). Lose the secret and the way back is a new key: nothing can recover it from the file."""

import argparse
import os
import sys
from pathlib import Path

from common.edge.auth import (
    ApiKeys,
    KeyLimits,
    KeyRecord,
    check_name,
    digest_of,
    new_secret,
)
from pdserve.command import Command


def add_key(path: Path, name: str, limits: KeyLimits) -> str:
    """Append a new key named `name` to the key file (made 0600 if new) and return its secret."""
    check_name(name)
    existing = path.read_text() if path.exists() else ""
    if existing and name in ApiKeys.load(path).names:
        raise ValueError(f"{path} already has a key named {name!r}: pick another name, or delete its line first")
    secret = new_secret()
    line = KeyRecord(name, digest_of(secret), limits).line()
    separator = "\n" if existing and not existing.endswith("\n") else ""
    # The file holds no secret, but who may call the gateway is still nobody else's business.
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    with os.fdopen(descriptor, "a") as file:
        file.write(f"{separator}{line}\n")
    return secret


def _add_arguments(parser: argparse.ArgumentParser, _model_dir: Path) -> None:
    parser.add_argument("--file", type=Path, required=True, help="the key file (the gateway's --api-keys-file)")
    parser.add_argument("--name", required=True, help="who the key is for; shown in logs and metrics")
    parser.add_argument("--max-concurrent", type=int, default=None,
                        help="requests in flight at once (default: no limit)")
    parser.add_argument("--tokens-per-minute", type=int, default=None,
                        help="prompt plus generated tokens per minute (default: no limit)")


def _run(args: argparse.Namespace, _model_dir: Path) -> int:
    limits = KeyLimits(args.max_concurrent, args.tokens_per_minute)
    secret = add_key(args.file, args.name, limits)
    print(secret)
    print(f"added key {args.name!r} to {args.file}. The secret above is shown this once; clients send it as "
          "`authorization: Bearer <key>` metadata.", file=sys.stderr)
    return 0


COMMAND = Command("keys", "make an API key for the gateway: prints the secret once, appends its hash to a key file",
                  _add_arguments, _run)
