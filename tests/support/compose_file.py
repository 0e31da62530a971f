"""compose.yaml as the tests read it: where it is, its tiers, and each command parsed by the real CLI."""

import argparse
from pathlib import Path

import pytest

from pdserve.cli import build_parser

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_PATH = ROOT / "compose.yaml"
TIERS = ("gateway", "prefill", "decode")


def parse_command(command: list[str]) -> argparse.Namespace:
    try:
        return build_parser(Path("/unused-default-model")).parse_args(command)
    except SystemExit:
        pytest.fail(f"pdserve rejects the command {command}")
