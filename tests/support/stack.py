"""Starting and stopping a stack with the real launcher (`pdserve up`), for fixtures and tests."""

import ctypes
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc
from stack_probes import free_port_run, tier_pids

from common.edge.server import Tls, is_serving, make_channel
from pdserve.certs import ensure_certs
from pdserve.launcher import free_port
from pdserve.v1 import (
    decode_pb2,
    decode_pb2_grpc,
    gateway_pb2_grpc,
    prefill_pb2,
    prefill_pb2_grpc,
)

# Small chunks and blocks so ordinary test prompts exercise chunked prefill and many KV blocks.
STACK_CHUNK_SIZE = 32
STACK_BLOCK_SIZE = 16
_START_TIMEOUT_S = 180
_PR_SET_PDEATHSIG = 1  # prctl(2)
# The development CA and tier certificates every test stack uses (pdserve up --certs-dir): the tiers speak
# mutual TLS among themselves, as they do by default; tests reach the internal tiers with the gateway's identity.
CERTS_DIR = Path(tempfile.gettempdir()) / f"pdserve-test-certs-{os.getuid()}"


def tier_identity() -> Tls:
    """The gateway's certificate from the test CA: what lets a test call the internal tiers directly."""
    certs = ensure_certs(CERTS_DIR)
    return Tls.from_files(*certs.for_tier("gateway"), certs.ca)


def internal_channel(address: str) -> grpc.Channel:
    """A channel to a prefill or decode tier of a test stack (mutual TLS with the test CA)."""
    return make_channel(address, tier_identity())


@dataclass
class Stack:
    process: subprocess.Popen
    gateway_address: str
    prefill_address: str
    decode_address: str
    gateway: gateway_pb2_grpc.GatewayStub
    prefill: prefill_pb2_grpc.PrefillStub
    decode: decode_pb2_grpc.DecodeStub

    def decode_stats(self) -> decode_pb2.DecodeStats:
        return self.decode.Stats(decode_pb2.StatsRequest(), timeout=10)

    def prefill_stats(self) -> prefill_pb2.PrefillStats:
        return self.prefill.Stats(prefill_pb2.PrefillStatsRequest(), timeout=10)

    def tier_pid(self, tier: str) -> int:
        """The process id of one tier ("prefill", "decode", "gateway") under this stack's launcher."""
        return tier_pids(self.process.pid)[tier]


def launch_stack(model_dir: Path, *extra: str, env: dict[str, str] | None = None, prefill_replicas: int = 1,
                 decode_replicas: int = 1) -> tuple[subprocess.Popen, dict[str, str]]:
    """`pdserve up` on free ports. Metrics are off unless `extra` passes --metrics-port, so stacks run side by
    side and never take the default metrics ports; `env` replaces the environment (e.g. OTEL_* variables).
    Returns the launcher and each instance's address: "gateway", "prefill-i", "decode-i", and "prefill" and
    "decode" for replica 0. Every prompt takes the prefill tier (--local-prefill-tokens 0), as the tests of the
    disaggregated path expect, unless `extra` sets the threshold (tests/integration/test_prefix_caching.py)."""
    if "--local-prefill-tokens" not in extra:
        extra = ("--local-prefill-tokens", "0", *extra)
    ports = {"gateway": free_port("127.0.0.1"), "prefill": free_port_run("127.0.0.1", prefill_replicas),
             "decode": free_port_run("127.0.0.1", decode_replicas)}
    command = [sys.executable, "-m", "pdserve.cli", "up", "--model", str(model_dir),
               "--port", str(ports["gateway"]), "--prefill-port", str(ports["prefill"]),
               "--decode-port", str(ports["decode"]), "--prefill-replicas", str(prefill_replicas),
               "--decode-replicas", str(decode_replicas), "--chunk-size", str(STACK_CHUNK_SIZE),
               "--max-batch-tokens", str(4 * STACK_CHUNK_SIZE), "--block-size", str(STACK_BLOCK_SIZE),
               "--metrics-port", "0", "--http-port", "0", "--certs-dir", str(CERTS_DIR), "--drain-timeout-s", "5", *extra]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                               preexec_fn=_stop_with_parent)
    # Drained all along into process.output: an unread pipe fills (64 KiB) and then blocks every tier that logs.
    process.output = []
    threading.Thread(target=lambda: process.output.extend(process.stdout), daemon=True).start()
    addresses = {name: f"127.0.0.1:{port}" for name, port in ports.items()}
    addresses |= {f"{tier}-{i}": f"127.0.0.1:{ports[tier] + i}"
                  for tier, count in (("prefill", prefill_replicas), ("decode", decode_replicas)) for i in range(count)}
    deadline = time.monotonic() + _START_TIMEOUT_S
    identity = None if "--insecure" in extra else tier_identity()
    while not all(is_serving(a, tls=None if name == "gateway" else identity) for name, a in addresses.items()):
        if process.poll() is not None:
            time.sleep(0.5)  # the drain thread reads what is left
            raise RuntimeError(f"pdserve up exited with {process.returncode}:\n{''.join(process.output)}")
        if time.monotonic() > deadline:
            stop_stack(process)
            raise RuntimeError("pdserve up did not start in time")
        time.sleep(0.5)
    return process, addresses


@contextmanager
def running_stack(model_dir: Path, *extra: str) -> Iterator[Stack]:
    """`pdserve up` with `extra` flags (launch_stack), with a stub per tier; stopped on leaving."""
    process, addresses = launch_stack(model_dir, *extra)
    channels = {name: grpc.insecure_channel(address) if name == "gateway" else internal_channel(address)
                for name, address in addresses.items()}
    try:
        yield Stack(process=process, gateway_address=addresses["gateway"], prefill_address=addresses["prefill"],
                    decode_address=addresses["decode"], gateway=gateway_pb2_grpc.GatewayStub(channels["gateway"]),
                    prefill=prefill_pb2_grpc.PrefillStub(channels["prefill"]),
                    decode=decode_pb2_grpc.DecodeStub(channels["decode"]))
    finally:
        for channel in channels.values():
            channel.close()
        stop_stack(process)


def _stop_with_parent() -> None:
    """In the child before exec: SIGTERM when the test process dies, so a killed test run leaves no stack."""
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def stop_stack(process: subprocess.Popen) -> int:
    process.send_signal(signal.SIGTERM)
    try:
        return process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        return process.wait()


@contextmanager
def paused(pid: int):
    """The process stopped (SIGSTOP) inside the block and resumed (SIGCONT) however the block ends: a test's
    way to hold a tier still while it sets up what must happen meanwhile, instead of racing the clock."""
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)
