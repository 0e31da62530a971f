"""A subcommand of `pdserve`: its name, one line of help, its flags and what it runs. pdserve/cli.py keeps
the registry; each module that owns a command declares it, importing nothing heavy at module level (the CLI
sets up the process before torch loads)."""

import argparse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Command:
    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser, Path], None]  # (parser, the default model's directory)
    run: Callable[[argparse.Namespace, Path], int]  # exit code
