"""One stack of the checkout this runs in: start `pdserve up` on free ports, bench its gateway, record each
tier's RSS and the greedy token ids of fixed prompts, stop it (see checkouts_bench.sh). With --compare, the
side-by-side table of a finished run."""

import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

PROMPTS = ["The capital of France is", "def fibonacci(n):\n    ", "Once upon a time, in a small village by the sea,",
           "List the days of the week: Monday, Tuesday,", "Water boils at a temperature of"]
BENCH = ["--workload", "mixed", "--num-requests", "16", "--concurrency", "4", "--warmup", "1", "--no-progress",
         "--max-duration-s", "300"]


def _cli() -> list[str]:
    module = "pdserve.cli" if Path("pdserve/cli.py").exists() else "common.cli"  # before and after the move
    return [sys.executable, "-m", module]


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _rss_mib(pid: int) -> dict[str, float]:
    """VmRSS of each tier process under the launcher, by its subcommand."""
    out = {}
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
            status = Path(f"/proc/{entry}/status").read_text()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid and len(argv) > 3:
            rss = next(line for line in status.splitlines() if line.startswith("VmRSS"))
            out[argv[3].decode()] = int(rss.split()[1]) / 1024
    return out


def serve_and_measure(out: Path) -> None:
    import grpc

    from pdserve.v1 import gateway_pb2, gateway_pb2_grpc

    port = _free_port()
    stack = subprocess.Popen([*_cli(), "up", "--port", str(port), "--metrics-port", "0"], stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    address = f"127.0.0.1:{port}"
    try:
        with grpc.insecure_channel(address) as channel:
            grpc.channel_ready_future(channel).result(timeout=300)
            stub = gateway_pb2_grpc.GatewayStub(channel)
            time.sleep(5)  # the tiers behind the gateway
            greedy = {p: [t for r in stub.Generate(gateway_pb2.GenerateRequest(prompt=p, max_new_tokens=24), timeout=300)
                          for t in r.token_ids] for p in PROMPTS}
        subprocess.run([*_cli(), "bench", "--address", address, "--out", str(out), *BENCH], check=True,
                       stdout=subprocess.DEVNULL)
        (out / "side.json").write_text(json.dumps({"greedy": greedy, "rss_mib": _rss_mib(stack.pid)}, indent=1))
    finally:
        stack.send_signal(signal.SIGTERM)
        stack.wait(timeout=60)


def compare(out: Path, rounds: int) -> None:
    rows = {}
    for side in ("old", "new"):
        runs = [json.loads((out / f"{side}-{r}" / "summary.json").read_text()) for r in range(1, rounds + 1)]
        sides = [json.loads((out / f"{side}-{r}" / "side.json").read_text()) for r in range(1, rounds + 1)]
        metric = [run["runs"][0] for run in runs]
        rows[side] = {
            "output tok/s": [m["output_tokens_per_s"] for m in metric],
            "TTFT p50 ms": [m["ttft_ms"]["p50"] for m in metric],
            "TPOT p50 ms": [m["tpot_ms"]["p50"] for m in metric],
            "gateway RSS MiB": [s["rss_mib"].get("gateway", 0) for s in sides],
            "prefill RSS MiB": [s["rss_mib"].get("prefill", 0) for s in sides],
            "decode RSS MiB": [s["rss_mib"].get("decode", 0) for s in sides],
        }
        rows[side]["greedy"] = sides[0]["greedy"]
    print(f"machine: {runs[0].get('machine', '?')}")
    print("| measure | old (each round) | new (each round) | new / old (medians) |\n|---|---|---|---|")
    for name in rows["old"]:
        if name == "greedy":
            continue
        old, new = rows["old"][name], rows["new"][name]
        ratio = statistics.median(new) / statistics.median(old) if statistics.median(old) else float("nan")
        print(f"| {name} | {', '.join(f'{v:.1f}' for v in old)} | {', '.join(f'{v:.1f}' for v in new)} | {ratio:.2f} |")
    same = rows["old"]["greedy"] == rows["new"]["greedy"]
    print(f"\ngreedy token ids of {len(PROMPTS)} prompts x 24 tokens identical: {same}")


if __name__ == "__main__":
    if sys.argv[1] == "--compare":
        compare(Path(sys.argv[2]), int(sys.argv[3]))
    else:
        serve_and_measure(Path(sys.argv[1]))
