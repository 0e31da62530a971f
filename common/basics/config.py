"""One frozen configuration per service, validated on construction and passed down explicitly.
Built once in main() from CLI flags (pdserve/cli.py); nothing here reads the environment."""

import os
from dataclasses import dataclass
from pathlib import Path

# KV cache element types the tiers can store and exchange (common/kv/wire.py maps them to torch).
# int8 and fp8 (float8 e4m3fn) are quantised: codes plus a float32 scale per token and KV head
# (common/kv/quant.py). Kept here, torch-free, so the CLI can set up the process before torch loads.
KV_DTYPES = ("float32", "float16", "bfloat16", "int8", "fp8")
# "dual": float32 weights on CPU also get a oneDNN-blocked copy for products of several rows (common/model/linear.py)
CPU_WEIGHT_LAYOUTS = ("dual", "single")
SPECULATIVE_METHODS = ("none", "prompt-lookup", "draft")
# How a tier stores its weights; common/model/linear.py registers each (a unit test keeps the two equal).
WEIGHT_FORMAT_NAMES = ("fp32", "fp16", "bf16", "fp8-e4m3", "int8", "int4", "int4-g32", "int4-g64", "int4-g128",
                       "int4-awq", "int4-awq-g32", "int4-awq-g64", "int4-awq-g128")

DEFAULT_GATEWAY_PORT = 50051


def default_model_dir(cache_home: str | None, home: str) -> Path:
    """Where the prepared default model lives: $XDG_CACHE_HOME/pdserve/models/... (outside git)."""
    base = Path(cache_home) if cache_home else Path(home) / ".cache"
    return base / "pdserve" / "models" / "SmolLM2-135M-Instruct"


def _check_port(port: int) -> None:
    if not 0 <= port <= 65535:
        raise ValueError(f"port must be in [0, 65535], got {port}")


def _check_threads(threads: int) -> None:
    if threads < 0:
        raise ValueError(f"threads must be >= 0 (0 means all available cores), got {threads}")


def resolve_threads(threads: int) -> int:
    return threads or len(os.sched_getaffinity(0))


@dataclass(frozen=True)
class TierConfig:
    """What prefill and decode share: the model, the KV layout and the process."""

    model_dir: Path
    host: str = "127.0.0.1"
    port: int = 0
    block_size: int = 16
    kv_dtype: str = "float32"
    kv_memory_mb: int = 1024
    threads: int = 0
    device: str = "auto"  # "auto" (CUDA when present), "cpu", "cuda" or "cuda:N"
    weights: str = "fp32"  # weight format of this tier (common/model/linear.py WEIGHT_FORMATS)
    cpu_weight_layout: str = "dual"  # CPU_WEIGHT_LAYOUTS

    def __post_init__(self) -> None:
        _check_port(self.port)
        _check_threads(self.threads)
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")
        if self.kv_dtype not in KV_DTYPES:
            raise ValueError(f"kv_dtype must be one of {sorted(KV_DTYPES)}, got {self.kv_dtype!r}")
        if self.kv_memory_mb < 1:
            raise ValueError(f"kv_memory_mb must be >= 1, got {self.kv_memory_mb}")
        if self.cpu_weight_layout not in CPU_WEIGHT_LAYOUTS:
            raise ValueError(f"cpu_weight_layout must be one of {', '.join(CPU_WEIGHT_LAYOUTS)}, "
                             f"got {self.cpu_weight_layout!r}")
        if self.weights not in WEIGHT_FORMAT_NAMES:
            raise ValueError(f"weights must be one of {', '.join(WEIGHT_FORMAT_NAMES)}, got {self.weights!r}")


@dataclass(frozen=True)
class DecodeConfig(TierConfig):
    max_batch_size: int = 64
    lease_ms: int = 30_000
    speculative: str = "none"  # none | prompt-lookup | draft
    num_speculative_tokens: int = 8
    speculative_max_batch: int = 8  # larger batches are compute-bound: no speculation there
    speculative_adaptive: bool = True  # False: always propose num_speculative_tokens (to measure acceptance)
    draft_model: Path | None = None  # the draft's checkpoint directory, with speculative "draft"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.speculative not in SPECULATIVE_METHODS:
            raise ValueError(f"speculative must be one of {SPECULATIVE_METHODS}, got {self.speculative!r}")
        if not 1 <= self.num_speculative_tokens <= 16:
            raise ValueError(f"num_speculative_tokens must be in [1, 16], got {self.num_speculative_tokens}")
        if (self.speculative == "draft") != (self.draft_model is not None):
            raise ValueError("--speculative draft and --draft-model PATH go together: the draft model is the proposer")
        if self.max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {self.max_batch_size}")
        if self.lease_ms < 1:
            raise ValueError(f"lease_ms must be >= 1, got {self.lease_ms}")


@dataclass(frozen=True)
class PrefillConfig(TierConfig):
    kv_memory_mb: int = 256
    chunk_size: int = 256
    max_batch_tokens: int = 512

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {self.chunk_size}")
        if self.max_batch_tokens < self.chunk_size:
            raise ValueError(f"max_batch_tokens ({self.max_batch_tokens}) must be >= chunk_size ({self.chunk_size})")


@dataclass(frozen=True)
class GatewayConfig:
    model_dir: Path
    prefill_addresses: tuple[str, ...]
    decode_addresses: tuple[str, ...]
    host: str = "127.0.0.1"
    port: int = DEFAULT_GATEWAY_PORT
    default_max_new_tokens: int = 256
    max_new_tokens_limit: int = 4096
    max_stop_strings: int = 16
    lease_ms: int = 30_000

    def __post_init__(self) -> None:
        _check_port(self.port)
        if not self.prefill_addresses or not self.decode_addresses:
            raise ValueError("the gateway needs at least one prefill and one decode address")
        if self.lease_ms < 1:
            raise ValueError(f"lease_ms must be >= 1, got {self.lease_ms}")
        if self.max_stop_strings < 0:
            raise ValueError(f"max_stop_strings must be >= 0, got {self.max_stop_strings}")
        if not 1 <= self.default_max_new_tokens <= self.max_new_tokens_limit:
            raise ValueError(
                f"default_max_new_tokens ({self.default_max_new_tokens}) must be in [1, max_new_tokens_limit]"
            )
