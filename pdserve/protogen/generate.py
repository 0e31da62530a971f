"""Regenerates the wire code in pdserve/v1/ from protos/ (`make protos`). Never edit the output by hand.

protoc's Python output imports modules by proto path (`from pdserve.v1 import common_pb2`), so the
generated package is the top-level `pdserve.v1`, mirroring the proto package `pdserve.v1`.
"""

import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
PROTO_ROOT = REPO_ROOT / "protos"
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")


def proto_files() -> list[Path]:
    return sorted((PROTO_ROOT / "pdserve" / "v1").glob("*.proto"))


def generate(out_dir: Path) -> list[Path]:
    """Writes the generated modules under out_dir/pdserve/v1/ and returns their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    protos = [str(p.relative_to(PROTO_ROOT)) for p in proto_files()]
    # protoc runs in its own process: grpc_tools carries the C++ protobuf runtime, and a process that has loaded it
    # aborts when NIXL's bindings (which carry their own) load after it (the test suite loads both).
    args = [
        sys.executable, "-m", "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *protos,
    ]
    result = subprocess.run(args, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"protoc failed: {' '.join(args)}\n{result.stderr}")
    generated = out_dir / "pdserve" / "v1"
    return sorted(p for p in generated.iterdir() if p.name.endswith(GENERATED_SUFFIXES))


def main() -> int:
    for path in generate(REPO_ROOT):
        print(path.relative_to(REPO_ROOT))
    return 0


if __name__ == "__main__":
    sys.exit(main())
