"""Supervisor: keeps the processes of a stack running until it is asked to stop.

Each instance (a tier replica) is started, waited for until its health service reports SERVING, and watched.
One that exits without being asked is started again after a back-off that doubles from RESTART_DELAY_S up to
MAX_RESTART_DELAY_S, and goes back to the shortest delay once it has served for STABLE_AFTER_S. Every tier
process is told to end (SIGTERM) if the supervisor itself dies (PR_SET_PDEATHSIG), so none outlives the stack.
Stopping sends SIGTERM to every instance (each drains what it holds), and SIGKILL to any still alive after the
drain timeout.
"""

import ctypes
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from common.edge.server import Tls, is_serving

RESTART_DELAY_S = 1.0
MAX_RESTART_DELAY_S = 30.0
STABLE_AFTER_S = 60.0
_PR_SET_PDEATHSIG = 1  # prctl(2)


@dataclass
class Instance:
    """One process of the stack: its name ("decode-1"), command line, address and the TLS identity its health is
    checked with (None for the gateway's public port, or plaintext tiers)."""

    name: str
    command: list[str]
    address: str
    tls: Tls | None = None
    cpus: frozenset[int] | None = None
    process: subprocess.Popen | None = None
    restarts: int = 0
    started_at: float = 0.0
    restart_at: float | None = None  # set while waiting out a back-off
    delay_s: float = RESTART_DELAY_S

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None


@dataclass
class Supervisor:
    instances: list[Instance]
    pin: Callable[[frozenset[int] | None], Callable[[], None] | None]
    log: Callable[[str], None] = field(default=lambda line: print(f"pdserve up: {line}", file=sys.stderr, flush=True))
    stop_requested: threading.Event = field(default_factory=threading.Event)

    def start_all(self) -> None:
        for instance in self.instances:
            self._start(instance)

    def wait_serving(self, timeout_s: float) -> bool:
        """True once every instance reports SERVING; False if one exits first, or at the timeout."""
        deadline = time.monotonic() + timeout_s
        pending = {i.name: i for i in self.instances}
        while pending and not self.stop_requested.is_set():
            for name, instance in sorted(pending.items()):
                if not instance.alive:
                    self.log(f"{name} exited with code {instance.process.returncode} while starting")
                    return False
                if is_serving(instance.address, tls=instance.tls):
                    del pending[name]
            if time.monotonic() > deadline:
                self.log(f"{', '.join(sorted(pending))} not serving after {timeout_s:.0f} s")
                return False
            time.sleep(0.2)
        return not pending

    def watch(self, interval_s: float = 0.5) -> None:
        """Restarts instances that die, until stop_requested is set."""
        while not self.stop_requested.wait(interval_s):
            now = time.monotonic()
            for instance in self.instances:
                self._tend(instance, now)

    def _tend(self, instance: Instance, now: float) -> None:
        if instance.alive:
            if now - instance.started_at >= STABLE_AFTER_S:
                instance.delay_s = RESTART_DELAY_S
            return
        if instance.restart_at is None:
            code = instance.process.returncode
            instance.restart_at = now + instance.delay_s
            self.log(f"{instance.name} exited with code {code}; starting it again in {instance.delay_s:.0f} s")
            instance.delay_s = min(instance.delay_s * 2, MAX_RESTART_DELAY_S)
        elif now >= instance.restart_at:
            instance.restarts += 1
            self._start(instance)
            self.log(f"{instance.name} started again (restart {instance.restarts})")

    def _start(self, instance: Instance) -> None:
        pin = self.pin(instance.cpus)

        def prepare() -> None:  # in the child, before exec
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
            if pin is not None:
                pin()

        instance.process = subprocess.Popen(instance.command, preexec_fn=prepare)
        instance.started_at, instance.restart_at = time.monotonic(), None

    def stop_all(self, timeout_s: float) -> None:
        """SIGTERM to every instance (each drains), then SIGKILL to any alive after timeout_s."""
        self.stop_requested.set()
        running = [i.process for i in self.instances if i.alive]
        for process in running:
            process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        for process in running:
            try:
                process.wait(timeout=max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
