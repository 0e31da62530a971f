"""Roofline lines for the report, from two torch micro-benchmarks run here and now:

- memory bandwidth: summing a 256 MiB fp32 tensor streams it from memory once, as a batch-1 decode step
  streams every weight once; the floor of a batch-1 step is weight bytes / that bandwidth;
- fp32 matrix-product FLOP/s: a 2048^3 matmul; a token costs about 2 x parameters FLOPs in the linear
  layers, so the ceiling of saturated throughput is FLOP/s / (2 x parameters).
Both run at a given torch thread count (the decode tier's cores), best of a few repetitions.
"""

import json
import struct
import time
from pathlib import Path

import torch

_BANDWIDTH_BYTES = 256 * 2**20
_MATMUL_N = 2048
_REPEATS = 5


def _best_s(fn, repeats: int = _REPEATS) -> float:
    fn()  # warm-up: page faults, thread pool start
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - started)
    return best


def memory_bandwidth_gbs(threads: int) -> float:
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        x = torch.ones(_BANDWIDTH_BYTES // 4, dtype=torch.float32)
        return _BANDWIDTH_BYTES / _best_s(lambda: x.sum()) / 1e9
    finally:
        torch.set_num_threads(previous)


def matmul_gflops(threads: int) -> float:
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        a = torch.randn(_MATMUL_N, _MATMUL_N)
        b = torch.randn(_MATMUL_N, _MATMUL_N)
        return 2 * _MATMUL_N**3 / _best_s(lambda: a @ b) / 1e9
    finally:
        torch.set_num_threads(previous)


def count_parameters(model_dir: Path) -> int:
    """Elements in the checkpoint's safetensors files (read from their headers, no tensor loaded)."""
    total = 0
    for path in sorted(model_dir.glob("*.safetensors")):
        with open(path, "rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(header_len))
        for name, info in header.items():
            if name != "__metadata__":
                total += _numel(info["shape"])
    if total == 0:
        raise FileNotFoundError(f"no safetensors weights in {model_dir}")
    return total


def _numel(shape: list[int]) -> int:
    n = 1
    for dim in shape:
        n *= dim
    return n


def roofline(model_dir: Path, threads: int, bytes_per_param: int = 4) -> dict:
    """The measured machine figures and the two model lines (fp32 weights as served)."""
    params = count_parameters(model_dir)
    bandwidth = memory_bandwidth_gbs(threads)
    flops = matmul_gflops(threads)
    weight_bytes = params * bytes_per_param
    return {
        "threads": threads,
        "num_parameters": params,
        "weight_bytes": weight_bytes,
        "memory_bandwidth_gbs": round(bandwidth, 2),
        "matmul_gflops": round(flops, 1),
        "batch1_step_floor_ms": round(weight_bytes / (bandwidth * 1e9) * 1000, 2),
        "saturated_tokens_per_s_ceiling": round(flops * 1e9 / (2 * params), 1),
    }


def served_weight_bytes(model_dir: Path, weights: str) -> int:
    """Weight bytes a batch-1 step reads: the format's bytes, one copy (the CPU layout's second copy serves
    products of several rows, or replaces the first); "gguf": the default model's GGUF file."""
    if weights == "gguf":
        from pdserve.prepare.default_model import default_gguf_path

        return default_gguf_path().stat().st_size
    if weights in ("fp32", "dense"):
        return count_parameters(model_dir) * 4
    from common.model.weights import load_model, stored_weight_bytes

    return stored_weight_bytes(load_model(model_dir, weights))["total"]


def verify_step_costs(model_dir: Path, threads: int, num_tokens: int, repeats: int = 3) -> dict:
    """The decode tier's own start-up measurement when it speculates (decode_svc/calibration.py, run
    here on a runtime built as the tier builds it, at `threads` torch threads): a batch-1 step verifying
    k = 0..num_tokens draft tokens, in plain (k = 0) steps. Taken `repeats` times; the median per k is
    reported with every series. This is what speculation trades against: with acceptance a, k drafts yield
    (1 - a^(k+1)) / (1 - a) tokens for cost[k] steps."""
    from common.basics.config import DecodeConfig
    from common.runtime.tier import build_runtime
    from decode_svc.calibration import measure_step_costs

    previous = torch.get_num_threads()
    try:
        runtime = build_runtime(DecodeConfig(model_dir=model_dir, threads=threads, kv_memory_mb=64))
        series = [[round(c, 3) for c in measure_step_costs(runtime.runner, runtime.blocks, num_tokens)]
                  for _ in range(repeats)]
    finally:
        torch.set_num_threads(previous)
    median = [sorted(column)[len(column) // 2] for column in zip(*series)]
    return {"threads": threads, "relative_cost": median, "series": series}
