"""Regenerates the wire code in pdserve/v1/ from protos/ (`make protos`). Never edit the output by hand.

protoc's Python output imports modules by proto path (`from pdserve.v1 import common_pb2`), so the
generated package is the top-level `pdserve.v1`, mirroring the proto package `pdserve.v1`.
"""

import sys
from pathlib import Path

from grpc_tools import protoc

REPO_ROOT = Path(__file__).resolve().parents[2]
PROTO_ROOT = REPO_ROOT / "protos"
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")


def proto_files() -> list[Path]:
    return sorted((PROTO_ROOT / "pdserve" / "v1").glob("*.proto"))


def generate(out_dir: Path) -> list[Path]:
    """Writes the generated modules under out_dir/pdserve/v1/ and returns their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    protos = [str(p.relative_to(PROTO_ROOT)) for p in proto_files()]
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *protos,
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed: {' '.join(args)}")
    generated = out_dir / "pdserve" / "v1"
    return sorted(p for p in generated.iterdir() if p.name.endswith(GENERATED_SUFFIXES))


def main() -> int:
    for path in generate(REPO_ROOT):
        print(path.relative_to(REPO_ROOT))
    return 0


if __name__ == "__main__":
    sys.exit(main())
