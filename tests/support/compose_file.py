"""compose.yaml as the tests read it: where it is, its tiers, each command parsed by the real CLI, and the
effective services of one or more compose files (later files merged over earlier ones, ${VAR} interpolated,
profiles applied) the way the Compose specification defines them for the keys these files use."""

import argparse
import os
import re
from collections.abc import Mapping
from pathlib import Path

import pytest
import yaml

from pdserve.cli import build_parser

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_PATH = ROOT / "compose.yaml"
GPU_COMPOSE_PATH = ROOT / "compose.gpu.yaml"
TIERS = ("gateway", "prefill", "decode")
# ${NAME}, ${NAME:-default} (unset or empty), ${NAME-default} (unset), and $$ for a literal $.
_VARIABLE = re.compile(r"\$(?:\$|\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?-)(?P<default>[^}]*))?\})")


def parse_command(command: list[str]) -> argparse.Namespace:
    try:
        return build_parser(Path("/unused-default-model")).parse_args(command)
    except SystemExit:
        pytest.fail(f"pdserve rejects the command {command}")


def interpolate(value, environ: Mapping[str, str]):
    """Every string in `value` with its ${...} references replaced from `environ`."""
    if isinstance(value, dict):
        return {key: interpolate(item, environ) for key, item in value.items()}
    if isinstance(value, list):
        return [interpolate(item, environ) for item in value]
    if not isinstance(value, str):
        return value

    def replace(match: re.Match) -> str:
        if match.group(0) == "$$":
            return "$"
        name, op, default = match.group("name", "op", "default")
        found = environ.get(name)
        if op == ":-" and not found or op == "-" and found is None:
            return default
        return found or ""

    return _VARIABLE.sub(replace, value)


def merge(base, override):
    """Compose's merge of an override file: mappings merge key by key, anything else is replaced."""
    if isinstance(base, dict) and isinstance(override, dict):
        return {key: merge(base[key], item) if key in base else item for key, item in override.items()} | {
            key: item for key, item in base.items() if key not in override}
    return override


def load_compose(*paths: Path, environ: Mapping[str, str] | None = None,
                 profiles: tuple[str, ...] = ()) -> dict:
    """The effective file: `paths` merged in order, interpolated, with only the services whose profiles are
    active (a service without `profiles` always is). Top-level `x-` extension fields are dropped."""
    environ = os.environ if environ is None else environ
    merged: dict = {}
    for path in paths or (COMPOSE_PATH,):
        merged = merge(merged, yaml.safe_load(path.read_text()))
    merged = interpolate({key: value for key, value in merged.items() if not key.startswith("x-")}, environ)
    merged["services"] = {name: service for name, service in merged["services"].items()
                          if not service.get("profiles") or set(service["profiles"]) & set(profiles)}
    return merged
