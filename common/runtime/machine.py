"""What machine a figure came from: the CPU's model and the vector units its kernels can use (MKL, oneDNN and
FBGEMM pick different kernels, and so different summation orders and speeds, by these), the GPU where one is
used, and the torch build. Tests print it in their session header; every summary the project writes carries it;
tiers log it at start-up."""

import os
import platform
from functools import cache

# /proc/cpuinfo flags that change which kernels the libraries choose.
_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "avx_vnni", "amx_bf16", "amx_int8", "amx_tile")


@cache
def machine_facts() -> dict:
    """A plain dict, JSON-ready: cpu (model name), cpu_capability (torch's chosen ATen kernel level), the
    flags present, avx512_bf16 / avx512_vnni / amx as booleans, cores usable by this process, and gpu (the
    CUDA device's name, or None)."""
    import torch

    model, flags = _cpuinfo()
    return {
        "cpu": model,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_flags": [flag for flag in _FLAGS if flag in flags],
        "avx512_bf16": "avx512_bf16" in flags,
        "avx512_vnni": "avx512_vnni" in flags,
        "amx": any(flag.startswith("amx") for flag in flags),
        "cores": len(os.sched_getaffinity(0)),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def describe_machine() -> str:
    """One line for logs, headers and reports."""
    facts = machine_facts()
    units = ", ".join(f"{name} {'yes' if facts[name] else 'no'}" for name in ("avx512_bf16", "avx512_vnni", "amx"))
    gpu = f"; GPU {facts['gpu']}" if facts["gpu"] else "; no GPU"
    return (f"{facts['cpu']} ({facts['cores']} cores usable, torch CPU capability {facts['cpu_capability']}, "
            f"{units}){gpu}; torch {facts['torch']}")


def _cpuinfo() -> tuple[str, set[str]]:
    try:
        with open("/proc/cpuinfo") as f:
            lines = f.read().splitlines()
    except OSError:
        return platform.processor() or "unknown CPU", set()
    model = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), "unknown CPU")
    flags = next((line.split(":", 1)[1].split() for line in lines if line.startswith("flags")), [])
    return model, set(flags)
