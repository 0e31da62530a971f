"""How the bench runs a peer: its options (cores, weights, KV pool), the process it starts pinned to its cores,
waiting until it serves, and stopping it. Which peers exist, and their command lines: pdserve/bench/peers.py."""

import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from common.edge.server import Tls, is_serving
from pdserve.affinity import pin_to

_START_TIMEOUT_S = 240.0
_STOP_TIMEOUT_S = 20.0


class PeerUnavailable(Exception):
    """The peer cannot run here; the message says why and how to get it."""


@dataclass(frozen=True)
class PeerOptions:
    model_dir: Path
    log_dir: Path
    certs_dir: Path | None = None  # stack peers speak mutual TLS with these certificates; None: plaintext
    prefill_cpus: frozenset[int] | None = None
    decode_cpus: frozenset[int] | None = None
    gateway_cpus: frozenset[int] | None = None
    max_batch_size: int = 32
    host: str = "127.0.0.1"
    draft_model: Path | None = None  # pdserve-draft's draft (`pdserve distill-draft` writes one)
    fixed_k: bool = False  # speculating peers always propose their k (--speculative-fixed-k): to measure acceptance
    weights: str = "fp32"  # every pdserve peer's weight format, both tiers (pdserve-fp16 excepted: always fp16)
    kv_blocks: int = 0  # every pdserve stack's KV pool in blocks, both tiers (`pdserve up --kv-blocks`); 0: default
    kv_dtype: str = "float32"  # every pdserve stack's KV cache dtype (`pdserve up --kv-dtype`)
    llama_server_slots: int = 16  # llama-server's --parallel: sequences it batches
    context_per_slot: int = 2048  # llama-server's context per slot: the longest request's prompt + new tokens

    @property
    def engine_cpus(self) -> frozenset[int] | None:
        """The cores of a single-process peer: the prefill and decode cores together."""
        if self.prefill_cpus is None or self.decode_cpus is None:
            return None
        return self.prefill_cpus | self.decode_cpus


@dataclass
class RunningPeer:
    name: str
    gateway_address: str
    stats_address: str | None  # a pdserve.v1.Decode Stats endpoint, or None
    stats_tls: Tls | None  # mutual TLS to it (a stack peer's decode tier)
    process: subprocess.Popen
    log_path: Path
    cpus: str

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=_STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def cpus_text(cpus: frozenset[int] | None) -> str:
    return ",".join(map(str, sorted(cpus))) if cpus else "any"


def launch(name: str, command: list[str], options: PeerOptions, addresses: list[str], gateway: str,
            stats: str | None, cpus: frozenset[int] | None, cpus_label: str, tls: Tls | None = None,
            ready: Callable[[], bool] | None = None, env: dict[str, str] | None = None) -> RunningPeer:
    """Starts a peer and waits until every address serves (those other than the gateway over `tls`, when given),
    or until `ready()` when given."""
    options.log_dir.mkdir(parents=True, exist_ok=True)
    log_path = options.log_dir / f"{name}.log"
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, preexec_fn=pin_to(cpus), env=env)
    peer = RunningPeer(name, gateway, stats, tls, process, log_path, cpus_label)
    deadline = time.monotonic() + _START_TIMEOUT_S
    ready = ready or (lambda: all(is_serving(a, tls=None if a == gateway else tls) for a in addresses))
    while not ready():
        if process.poll() is not None or time.monotonic() > deadline:
            peer.stop()
            raise RuntimeError(f"peer {name} did not start (exit {process.returncode}); see {log_path}")
        time.sleep(0.5)
    return peer
