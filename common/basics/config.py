"""One frozen configuration per service, validated on construction and passed down explicitly.

Each field's default and help live here, once: the CLI builds every tier's flags from these fields
(pdserve/flags.py), and `pdserve up` turns configurations back into each tier's command line the same way.
Nothing here reads the environment or imports torch."""

import importlib.util
import os
from dataclasses import dataclass, field
from pathlib import Path

from common.basics.sampling import MAX_LOGPROBS
from common.basics.targets import parse_target

# KV cache element types the tiers can store and exchange (common/kv/wire.py maps them to torch).
# int8 and fp8 (float8 e4m3fn) are quantised: codes plus a float32 scale per token and KV head
# (common/kv/quant.py). Kept here, torch-free, so the CLI can set up the process before torch loads.
KV_DTYPES = ("float32", "float16", "bfloat16", "int8", "fp8")
# "dual": float32 weights on CPU also get a oneDNN-blocked copy for products of several rows (common/model/linear.py)
CPU_WEIGHT_LAYOUTS = ("auto", "dual", "single")
SPECULATIVE_METHODS = ("none", "prompt-lookup", "draft")
# How the decode tier holds KV for the tokens a sequence will generate: "lazy" grows it a block at a time
# (preempting the most recently admitted sequence when the pool runs out), "upfront" reserves prompt +
# max_new_tokens at once (fewer sequences fit; kept to measure the difference).
KV_GROWTH = ("lazy", "upfront")
KV_TRANSPORTS = ("grpc", "nixl")
# NIXL's Python packages: the meta-package (which picks a build by CUDA version) or a build itself; and how to add it.
NIXL_MODULES = ("nixl", "nixl_cu12", "nixl_cu13")
NIXL_INSTALL = "pip install 'pdserve[nixl]' (NIXL's cu12 build; install torch first)"
# How a tier stores its weights; common/model/linear.py registers each (a unit test keeps the two equal).
WEIGHT_FORMAT_NAMES = ("fp32", "fp16", "bf16", "fp8-e4m3", "int8", "int4", "int4-g32", "int4-g64", "int4-g128",
                       *(f"int4-{method}{group}" for method in ("awq", "gptq")
                         for group in ("", "-g32", "-g64", "-g128")))

# Where each tier listens when run on its own (`pdserve gateway|prefill|decode`); configurations built in
# code default to port 0 (a free one).
DEFAULT_PORTS = {"gateway": 50051, "prefill": 50052, "decode": 50053}
DEFAULT_GATEWAY_PORT = DEFAULT_PORTS["gateway"]
# Where `pdserve up` serves the OpenAI-compatible HTTP API (vLLM's and SGLang's usual port).
DEFAULT_HTTP_PORT = 8000
# Conditional disaggregation's default threshold, measured (docs/benchmarks.md, "Conditional disaggregation").
LOCAL_PREFILL_TOKENS = 32
# On SIGTERM a tier stops taking work and lets what it holds finish for this long before it exits.
DEFAULT_DRAIN_TIMEOUT_S = 30.0


def option(default, help: str, **flag):
    """A configuration field with its command-line help; `flag` adjusts the flag (name, choices, action...)."""
    return field(default=default, metadata={"help": help, **flag})


def cache_root(cache_home: str | None, home: str) -> Path:
    """What pdserve keeps outside git on this machine: $XDG_CACHE_HOME/pdserve, else ~/.cache/pdserve."""
    return (Path(cache_home) if cache_home else Path(home) / ".cache") / "pdserve"


def default_model_dir(cache_home: str | None, home: str) -> Path:
    """Where the prepared default model lives: $XDG_CACHE_HOME/pdserve/models/... (outside git)."""
    return cache_root(cache_home, home) / "models" / "SmolLM2-135M-Instruct"


def default_certs_dir(cache_home: str | None, home: str) -> Path:
    """Where `pdserve up` keeps the development CA and the tiers' certificates (outside git)."""
    return cache_root(cache_home, home) / "certs"


def _check_port(port: int) -> None:
    if not 0 <= port <= 65535:
        raise ValueError(f"port must be in [0, 65535], got {port}")


def _check_targets(targets: tuple[str, ...]) -> None:
    """Each a host:port or a dns: name; raises ValueError naming a bad one."""
    for target in targets:
        parse_target(target)


def _check_threads(threads: int) -> None:
    if threads < 0:
        raise ValueError(f"threads must be >= 0 (0 means all available cores), got {threads}")


def resolve_threads(threads: int) -> int:
    return threads or len(os.sched_getaffinity(0))


@dataclass(frozen=True)
class TierConfig:
    """What prefill and decode share: the model, the KV layout and the process."""

    model_dir: Path = field(metadata={"flag": "--model", "help": "Hugging Face Llama checkpoint directory"})
    host: str = option("127.0.0.1", "address to listen on (0.0.0.0 in containers)")
    port: int = option(0, "port to listen on (0 picks a free one)")
    block_size: int = option(16, "tokens per KV block (both tiers must agree)")
    kv_dtype: str = option("float32", "KV cache dtype (both tiers must agree); int8 and fp8 store per-row scales",
                           choices=KV_DTYPES)
    kv_memory_mb: int = option(1024, "memory budget of the KV pool")
    kv_transport: str = option(
        "grpc", "how KV moves from prefill to decode (both tiers must agree): grpc, checksummed chunks on the "
                "tiers' gRPC connection; nixl, one-sided NIXL writes (UCX: RDMA, shared memory or TCP) straight "
                "into decode's reserved blocks, controlled over gRPC (needs NIXL: pip install 'pdserve[nixl]')",
        choices=KV_TRANSPORTS)
    kv_blocks: int = option(0, "KV pool size in blocks, overriding --kv-memory-mb (0: from --kv-memory-mb); for "
                               "tests and capacity planning")
    prefix_caching: bool = option(True, "keep full KV blocks after their request ends and reuse them for prompts "
                                        "that start with the same tokens (evicted least recently used)",
                                  negatable=True)
    threads: int = option(0, "torch threads (0: every core this process may use)")
    device: str = option("auto", "auto (CUDA when present), cpu, cuda or cuda:N")
    weights: str = option("fp32", "weight format (quantised formats are computed at the first start and saved "
                                  "under MODEL/quantized/)", choices=WEIGHT_FORMAT_NAMES, metavar="FORMAT")
    cpu_weight_layout: str = option(
        "auto", "dual: float32 CPU weights get a second, oneDNN-blocked copy (several-row products up to 1.5x "
                "faster, twice the memory); fp16 projections are held FBGEMM-packed, bf16 ones oneDNN-blocked "
                "where the CPU has bf16 units; single: one plain copy; auto: dual where it measures faster "
                "on this CPU at start-up", choices=CPU_WEIGHT_LAYOUTS)
    tls_cert: Path | None = option(None, "this tier's certificate (PEM) for mutual TLS with the other tiers")
    tls_key: Path | None = option(None, "its private key (PEM)")
    tls_ca: Path | None = option(None, "the CA that signs every tier's certificate: only its holders are let in")

    def __post_init__(self) -> None:
        _check_port(self.port)
        _check_threads(self.threads)
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")
        if self.kv_dtype not in KV_DTYPES:
            raise ValueError(f"kv_dtype must be one of {sorted(KV_DTYPES)}, got {self.kv_dtype!r}")
        if self.kv_transport not in KV_TRANSPORTS:
            raise ValueError(f"kv_transport must be one of {', '.join(KV_TRANSPORTS)}, got {self.kv_transport!r}")
        if self.kv_transport == "nixl" and not any(importlib.util.find_spec(m) for m in NIXL_MODULES):
            raise ValueError(f"--kv-transport nixl needs NIXL, which is not installed here: {NIXL_INSTALL}; or "
                             "leave --kv-transport at grpc")
        if self.kv_memory_mb < 1:
            raise ValueError(f"kv_memory_mb must be >= 1, got {self.kv_memory_mb}")
        if self.kv_blocks < 0:
            raise ValueError(f"kv_blocks must be >= 0 (0: sized by kv_memory_mb), got {self.kv_blocks}")
        if self.cpu_weight_layout not in CPU_WEIGHT_LAYOUTS:
            raise ValueError(f"cpu_weight_layout must be one of {', '.join(CPU_WEIGHT_LAYOUTS)}, "
                             f"got {self.cpu_weight_layout!r}")
        if self.weights not in WEIGHT_FORMAT_NAMES:
            raise ValueError(f"weights must be one of {', '.join(WEIGHT_FORMAT_NAMES)}, got {self.weights!r}")


@dataclass(frozen=True)
class DecodeConfig(TierConfig):
    max_batch_size: int = option(64, "most sequences per decode step")
    lease_ms: int = option(30_000, "how long an unclaimed reservation is held without KV arriving before its blocks "
                                   "are freed (each chunk of KV renews it)")
    max_lease_ms: int = option(300_000, "longest lease a caller may ask for in Reserve; longer ones are cut to it")
    speculative: str = option("none", "speculative decoding (outputs are unchanged)", choices=SPECULATIVE_METHODS)
    num_speculative_tokens: int = option(8, "most tokens proposed per step")
    speculative_max_batch: int = option(8, "no speculation while more sequences than this share a decode step")
    speculative_adaptive: bool = option(
        True, "always propose --num-speculative-tokens (no adaptive k): to measure acceptance",
        flag="--speculative-fixed-k", inverse=True)
    kv_growth: str = option("lazy", "lazy: KV blocks grow a block at a time as a sequence generates, and the most "
                                    "recently admitted sequence is preempted (recomputed later) when the pool runs "
                                    "out; upfront: prompt + max_new_tokens reserved at once", choices=KV_GROWTH)
    draft_model: Path | None = option(
        None, "with --speculative draft: a Llama-family checkpoint sharing the model's tokenizer "
              "(`pdserve distill-draft` trains one)")
    nixl_fence_ms: int = option(
        10_000, "--kv-transport nixl: how long the blocks of an ended reservation stay out of reuse after its "
                "writer's control stream broke without confirming that its writes stopped")
    step_prefill_tokens: int = option(
        0, "prompts prefilled on this tier (--local-prefill-tokens, recomputes) advance by at most this many tokens "
           "per step, between decode steps of the running batch (chunked prefill); 0: a prompt's whole KV first")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.nixl_fence_ms < 0:
            raise ValueError(f"nixl_fence_ms must be >= 0, got {self.nixl_fence_ms}")
        if self.step_prefill_tokens < 0:
            raise ValueError(f"step_prefill_tokens must be >= 0 (0: no limit), got {self.step_prefill_tokens}")
        if self.speculative not in SPECULATIVE_METHODS:
            raise ValueError(f"speculative must be one of {SPECULATIVE_METHODS}, got {self.speculative!r}")
        if not 1 <= self.num_speculative_tokens <= 16:
            raise ValueError(f"num_speculative_tokens must be in [1, 16], got {self.num_speculative_tokens}")
        if (self.speculative == "draft") != (self.draft_model is not None):
            raise ValueError("--speculative draft and --draft-model PATH go together: the draft model is the proposer")
        if self.max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {self.max_batch_size}")
        if self.kv_growth not in KV_GROWTH:
            raise ValueError(f"kv_growth must be one of {KV_GROWTH}, got {self.kv_growth!r}")
        if not 1 <= self.lease_ms <= self.max_lease_ms:
            raise ValueError(f"lease_ms must be in [1, max_lease_ms {self.max_lease_ms}], got {self.lease_ms}")


@dataclass(frozen=True)
class PrefillConfig(TierConfig):
    kv_memory_mb: int = option(512, "memory budget of the KV pool")
    decode_addresses: tuple[str, ...] = option(
        (), "a decode instance this tier may push KV to, host:port, or dns:///NAME:PORT for every address the name "
            "resolves to (repeatable): KV goes to no address a request names unless it is listed here",
        flag="--decode")
    chunk_size: int = option(256, "most prompt tokens of one prompt per step (chunked prefill)")
    max_batch_tokens: int = option(512, "most prompt tokens per step in all")
    max_queued_prompts: int = option(256, "most prompts waiting or computing; beyond, RESOURCE_EXHAUSTED with a "
                                          "retry delay")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.max_queued_prompts < 1:
            raise ValueError(f"max_queued_prompts must be >= 1, got {self.max_queued_prompts}")
        _check_targets(self.decode_addresses)
        if self.chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {self.chunk_size}")
        if self.max_batch_tokens < self.chunk_size:
            raise ValueError(f"max_batch_tokens ({self.max_batch_tokens}) must be >= chunk_size ({self.chunk_size})")


@dataclass(frozen=True)
class GatewayConfig:
    model_dir: Path = field(metadata={"flag": "--model", "help": "Hugging Face Llama checkpoint directory"})
    prefill_addresses: tuple[str, ...] = option(
        (), "prefill instances: host:port, or dns:///NAME:PORT (every address the name resolves to, followed as "
            "instances come and go; dns://SERVER/NAME:PORT asks that DNS server) (repeatable)", flag="--prefill")
    decode_addresses: tuple[str, ...] = option((), "decode instances, as --prefill (repeatable)", flag="--decode")
    resolve_interval_s: float = option(5.0, "how often DNS names in --prefill / --decode are resolved again")
    host: str = option("127.0.0.1", "address to listen on (0.0.0.0 in containers)")
    port: int = option(DEFAULT_GATEWAY_PORT, "port to listen on (0 picks a free one)")
    http_port: int | None = option(
        None, "also serve the OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions, /v1/models) on "
              "this port, on --host (0 picks a free one; default: off)")
    default_max_new_tokens: int = option(256, "max_new_tokens of a request that sets none")
    max_new_tokens_limit: int = option(4096, "largest max_new_tokens a request may ask for")
    max_stop_strings: int = option(16, "most stop strings (and most stop token ids) per request")
    max_completions: int = option(16, "most completions (n) a request may ask for")
    max_logprobs: int = option(20, "most alternatives a request may ask log-probabilities of per token "
                                   f"(at most {MAX_LOGPROBS})")
    lease_ms: int = option(30_000, "how long decode holds an unclaimed reservation")
    admission_factor: float = option(
        2.0, "requests admitted per decode batch slot in rotation (the decode instances report their batch size); "
             "beyond, RESOURCE_EXHAUSTED at once with a retry delay")
    local_prefill_tokens: int = option(
        LOCAL_PREFILL_TOKENS, "conditional disaggregation: a prompt whose part not cached on the chosen decode "
                              "instance is at most this many tokens is prefilled by that instance itself, skipping "
                              "the prefill tier and the KV transfer (0: always the prefill tier)")
    prefix_weight: float = option(
        1.0, "KV-aware routing: cost of one uncached prompt block against one block of load "
             "(cost = weight x uncached blocks + load blocks); 0 routes by load alone")
    cache_poll_ms: int = option(250, "how often the gateway asks each instance what its prefix cache holds and "
                                     "its load")
    tls_cert: Path | None = option(None, "the gateway's certificate (PEM) for mutual TLS with the tiers")
    tls_key: Path | None = option(None, "its private key (PEM)")
    tls_ca: Path | None = option(None, "the CA that signs every tier's certificate")
    public_tls_cert: Path | None = option(None, "serve the public port over TLS with this certificate (PEM)")
    public_tls_key: Path | None = option(None, "its private key (PEM)")
    api_keys_file: Path | None = option(
        None, "callers must send `authorization: Bearer KEY` with a key listed (hashed) in this file, made by "
              "`pdserve keys`; each key's concurrency and tokens-per-minute limits apply (default: no keys)")

    def __post_init__(self) -> None:
        _check_port(self.port)
        if (self.public_tls_cert is None) != (self.public_tls_key is None):
            raise ValueError("--public-tls-cert and --public-tls-key go together")
        if not self.prefill_addresses or not self.decode_addresses:
            raise ValueError("the gateway needs at least one prefill and one decode address")
        _check_targets((*self.prefill_addresses, *self.decode_addresses))
        if self.http_port is not None:
            _check_port(self.http_port)
        if not self.resolve_interval_s > 0:
            raise ValueError(f"resolve_interval_s must be > 0, got {self.resolve_interval_s}")
        if self.lease_ms < 1:
            raise ValueError(f"lease_ms must be >= 1, got {self.lease_ms}")
        if self.local_prefill_tokens < 0:
            raise ValueError(f"local_prefill_tokens must be >= 0, got {self.local_prefill_tokens}")
        if self.prefix_weight < 0:
            raise ValueError(f"prefix_weight must be >= 0, got {self.prefix_weight}")
        if self.cache_poll_ms < 1:
            raise ValueError(f"cache_poll_ms must be >= 1, got {self.cache_poll_ms}")
        if not self.admission_factor > 0:
            raise ValueError(f"admission_factor must be > 0, got {self.admission_factor}")
        if self.max_completions < 1:
            raise ValueError(f"max_completions must be >= 1, got {self.max_completions}")
        if not 0 <= self.max_logprobs <= MAX_LOGPROBS:
            raise ValueError(f"max_logprobs must be in [0, {MAX_LOGPROBS}], got {self.max_logprobs}")
        if self.max_stop_strings < 0:
            raise ValueError(f"max_stop_strings must be >= 0, got {self.max_stop_strings}")
        if not 1 <= self.default_max_new_tokens <= self.max_new_tokens_limit:
            raise ValueError(
                f"default_max_new_tokens ({self.default_max_new_tokens}) must be in [1, max_new_tokens_limit]"
            )
