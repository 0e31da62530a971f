"""The layout is the architecture, checked: the import contracts in pyproject.toml (import-linter), and a real
gateway process that never loads torch."""

import subprocess
import sys
import time
from pathlib import Path

from grpc_health.v1 import health_pb2
from stack_probes import free_port_run

from common.edge.server import health_status

ROOT = Path(__file__).resolve().parents[1]


def test_import_contracts_hold():
    """pdserve above the tiers above common, no tier importing another, common importing no tier or tool, the
    gateway and common's torch-free pieces importing no torch (pyproject.toml, [tool.importlinter])."""
    linter = Path(sys.executable).with_name("lint-imports")
    result = subprocess.run([str(linter)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


def test_a_serving_gateway_process_has_not_loaded_torch(model_dir):
    port = free_port_run("127.0.0.1", 1)
    process = subprocess.Popen([sys.executable, "-m", "pdserve.cli", "gateway", "--model", str(model_dir),
                                "--port", str(port), "--prefill", "127.0.0.1:1", "--decode", "127.0.0.1:2",
                                "--metrics-port", "0", "--http-port", "0"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while health_status(f"127.0.0.1:{port}") is None:
            assert process.poll() is None, process.stderr.read()
            assert time.monotonic() < deadline, "the gateway did not start"
            time.sleep(0.2)
        # Up and answering, and honest: nothing behind it can serve (its tiers' addresses are closed ports).
        assert health_status(f"127.0.0.1:{port}") == health_pb2.HealthCheckResponse.NOT_SERVING
        mapped = Path(f"/proc/{process.pid}/maps").read_text()
        assert "libtorch" not in mapped and "/torch/" not in mapped
    finally:
        process.terminate()
        process.wait(timeout=30)
