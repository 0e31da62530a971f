"""Resident memory of a peer's processes, sampled while it serves: what a machine must hold to run it.

A peer is a process tree (`pdserve up` and its tiers, or one server process). Each process is named by its role
(gateway, prefill, decode, colocated, launcher, or the program's name), and its peak resident set size (VmHWM
from /proc) is read every half second: a peak reached between samples is still caught by the next one, though a
process that ends before it is counted only up to its last sample.
"""

import threading
from pathlib import Path

_ROLES = ("gateway", "prefill", "decode", "colocated")
_PERIOD_S = 0.5


def _children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
    return found


def process_tree(pid: int) -> list[int]:
    """pid and its descendants (Linux /proc)."""
    tree, pending = [], [pid]
    while pending:
        current = pending.pop()
        tree.append(current)
        pending += _children(current)
    return tree


def role_of(pid: int) -> str | None:
    """The role a process plays: the pdserve subcommand it runs, else its program's name; None once it ended."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return None
    if "pdserve.cli" in argv:
        after = argv[argv.index("pdserve.cli") + 1:]
        role = after[0] if after else "pdserve"
        return role if role in _ROLES else "launcher"
    return Path(argv[0]).name or None


def peak_rss_bytes(pid: int) -> int | None:
    """The process's peak resident set size so far (VmHWM); None once it ended."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


class RssSampler:
    """Samples a process tree's peak resident memory while a run lasts:

        with RssSampler(peer.process.pid) as rss:
            ...
        rss.summary()  # {"decode": 1.23e9, "prefill": ..., "total": ...} in bytes
    """

    def __init__(self, pid: int | None) -> None:
        self.pid = pid
        self.peaks: dict[int, tuple[str, int]] = {}  # pid -> (role, peak bytes)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="rss-sampler")

    def __enter__(self) -> "RssSampler":
        if self.pid is not None:
            self.sample()
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.pid is not None:
            self._stop.set()
            self._thread.join()
            self.sample()

    def _run(self) -> None:
        while not self._stop.wait(_PERIOD_S):
            self.sample()

    def sample(self) -> None:
        for pid in process_tree(self.pid):
            role, peak = role_of(pid), peak_rss_bytes(pid)
            if role is not None and peak is not None:
                self.peaks[pid] = (role, max(peak, self.peaks.get(pid, (role, 0))[1]))

    def summary(self) -> dict[str, int]:
        """Peak bytes per role (replicas of a role numbered: decode, decode-2, ...), and their total."""
        named: dict[str, int] = {}
        for pid in sorted(self.peaks):
            role, peak = self.peaks[pid]
            name, n = role, 1
            while name in named:
                n += 1
                name = f"{role}-{n}"
            named[name] = peak
        return {**named, "total": sum(named.values())} if named else {}
