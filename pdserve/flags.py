"""Command-line flags made from the configuration dataclasses (common/basics/config.py), and back.

A field `kv_memory_mb` is the flag `--kv-memory-mb`, with the field's default and help; metadata may rename
the flag (`model_dir` is `--model`), give choices, or invert a boolean (`speculative_adaptive` is
`--speculative-fixed-k`) or make it negatable (`prefix_caching` is `--prefix-caching` / `--no-prefix-caching`). `add_flags` declares them, `config_from_args` builds the dataclass from the parsed
flags, and `to_argv` writes a configuration as the flags that rebuild it: how `pdserve up` starts each tier.
A prefix ("prefill-") lets one command carry one tier's copy of a field beside another's.
"""

import argparse
import dataclasses
import types
import typing
from collections.abc import Iterable


def _flag(spec: dataclasses.Field, prefix: str = "") -> str:
    return spec.metadata.get("flag") or "--" + prefix + spec.name.replace("_", "-")


def _dest(spec: dataclasses.Field, prefix: str = "") -> str:
    return _flag(spec, prefix)[2:].replace("-", "_")


def _kind(spec: dataclasses.Field, hints: dict) -> type:
    """The scalar type of a field: int, float, str, bool, Path (Optional and tuple[...] unwrapped)."""
    kind = hints[spec.name]
    if isinstance(kind, types.UnionType) or typing.get_origin(kind) is typing.Union:
        kind = next(arg for arg in typing.get_args(kind) if arg is not type(None))
    if typing.get_origin(kind) is tuple:
        kind = typing.get_args(kind)[0]
    return kind


def fields_of(cls: type, names: Iterable[str] | None = None) -> list[dataclasses.Field]:
    chosen = None if names is None else set(names)
    return [f for f in dataclasses.fields(cls) if chosen is None or f.name in chosen]


def add_flags(parser: argparse.ArgumentParser, cls: type, names: Iterable[str] | None = None, *, prefix: str = "",
              defaults: dict | None = None, whose: str = "") -> None:
    """Declares a flag for each named field of cls (every field when names is None)."""
    hints = typing.get_type_hints(cls)
    for spec in fields_of(cls, names):
        default = (defaults or {}).get(spec.name, spec.default)
        kind = _kind(spec, hints)
        help_text = (f"{whose}: " if whose else "") + spec.metadata.get("help", "")
        options = {k: spec.metadata[k] for k in ("choices", "metavar") if k in spec.metadata}
        if kind is bool and spec.metadata.get("negatable"):  # --name and --no-name
            parser.add_argument(_flag(spec, prefix), dest=_dest(spec, prefix), action=argparse.BooleanOptionalAction,
                                default=default, help=help_text + f" (default {'on' if default else 'off'})")
        elif kind is bool:
            action = "store_true" if spec.metadata.get("inverse") == bool(default) or not default else "store_false"
            parser.add_argument(_flag(spec, prefix), dest=_dest(spec, prefix), action=action, help=help_text)
        elif hints[spec.name] is not kind and typing.get_origin(hints[spec.name]) is tuple:
            parser.add_argument(_flag(spec, prefix), dest=_dest(spec, prefix), type=kind, action="append",
                                required=not default, help=help_text, **options)
        else:
            shown = "" if default is dataclasses.MISSING or default is None else f" (default {default})"
            parser.add_argument(_flag(spec, prefix), dest=_dest(spec, prefix), type=kind, help=help_text + shown,
                                default=None if default is dataclasses.MISSING else default, **options)


def field_values(cls: type, args: argparse.Namespace, names: Iterable[str] | None = None, *,
                 prefix: str = "") -> dict:
    """{field: value} of the named fields, read from flags that add_flags declared."""
    values = {}
    for spec in fields_of(cls, names):
        value = getattr(args, _dest(spec, prefix))
        if spec.metadata.get("inverse"):
            value = not value
        elif isinstance(value, list):
            value = tuple(value)
        values[spec.name] = value
    return values


def config_from_args(cls: type, args: argparse.Namespace, **overrides):
    """cls built from every one of its flags (as add_flags(parser, cls) declared them), overrides applied."""
    names = [f.name for f in dataclasses.fields(cls) if f.name not in overrides]
    return cls(**field_values(cls, args, names), **overrides)


def to_argv(config, names: Iterable[str] | None = None, *, prefix: str = "") -> list[str]:
    """The flags that rebuild the named fields of config (every field when names is None), each written out
    even at its default: a tier's own command-line defaults may differ (its listening port)."""
    argv = []
    for spec in fields_of(type(config), names):
        value, flag = getattr(config, spec.name), _flag(spec, prefix)
        if isinstance(value, bool) and spec.metadata.get("negatable"):
            argv += [flag if value else "--no-" + flag[2:]]
        elif isinstance(value, bool):
            argv += [flag] if value != bool(spec.metadata.get("inverse")) else []
        elif isinstance(value, tuple):
            argv += [part for item in value for part in (flag, str(item))]
        elif value is not None:
            argv += [flag, str(value)]
    return argv
