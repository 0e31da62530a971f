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


def _tier_processes(parent_pid: int):
    """(pid, argv) of each `python -m pdserve.cli` child of parent_pid."""
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{entry}/cmdline") as f:
                argv = f.read().split("\0")
        except OSError:
            continue
        if ppid == parent_pid and "pdserve.cli" in argv:
            yield int(entry), argv


def tier_pids(parent_pid: int) -> dict[str, int]:
    """Subcommand (gateway, prefill, decode...) -> pid of each tier process under parent_pid (replica 0's when
    there are several: see instance_pids)."""
    pids = {}
    for pid, argv in _tier_processes(parent_pid):
        pids.setdefault(argv[argv.index("pdserve.cli") + 1], pid)
    return pids


def instance_pids(parent_pid: int) -> dict[str, int]:
    """host:port -> pid of each tier instance under parent_pid: how a test finds one replica among several."""
    pids = {}
    for pid, argv in _tier_processes(parent_pid):
        if "--port" in argv:
            host = argv[argv.index("--host") + 1] if "--host" in argv else "127.0.0.1"
            pids[f"{host}:{argv[argv.index('--port') + 1]}"] = pid
    return pids
