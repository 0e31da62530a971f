"""What tests learn about a running stack from the operating system: free port runs and tier processes."""

import os
import socket


def free_port_run(host: str, count: int) -> int:
    """A base port with `count` consecutive free ports (checked by binding each)."""
    for _ in range(50):
        with socket.socket() as probe:
            probe.bind((host, 0))
            base = probe.getsockname()[1]
        if base + count > 65535:
            continue
        try:
            sockets = [socket.create_server((host, base + i)) for i in range(count)]
        except OSError:
            continue
        for sock in sockets:
            sock.close()
        return base
    raise RuntimeError("no run of free ports found")


def tier_pids(parent_pid: int) -> dict[str, int]:
    """Subcommand (gateway, prefill, decode...) -> pid of each `python -m pdserve.cli` child of parent_pid."""
    pids = {}
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{entry}/cmdline") as f:
                argv = f.read().split("\0")
        except OSError:
            continue
        if ppid == parent_pid and "pdserve.cli" in argv:
            pids[argv[argv.index("pdserve.cli") + 1]] = int(entry)
    return pids
