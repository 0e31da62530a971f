"""The peers `pdserve bench` starts and compares, one named run each, on the same model and machine:

  hf-static          Hugging Face transformers generate, static batches (pdserve/bench/hf_static.py)
  pdserve-colocated  `pdserve up --colocated`: prefill and decode engines in one process
  pdserve            `pdserve up`: the disaggregated stack
  pdserve-fp16       `pdserve up --prefill-weights fp16 --decode-weights fp16`: the same stack on fp16 weights
  pdserve-bf16       `pdserve up --prefill-weights bf16 --decode-weights bf16`: bf16 weights (oneDNN bf16 products
                     where the CPU has bf16 units)
  pdserve-spec       `pdserve up --speculative prompt-lookup`: the same stack, speculating by prompt lookup
  pdserve-draft      `pdserve up --speculative draft --draft-model DIR`: the same stack, speculating with a draft
  pdserve-no-prefix-cache   `pdserve up --no-prefix-caching`: the same stack, no KV reused across requests
  pdserve-no-local-prefill  `pdserve up --local-prefill-tokens 0`: every prompt prefilled by the prefill tier
  pdserve-upfront    `pdserve up --kv-growth upfront`: decode reserves prompt + max_new_tokens of KV at once
  pdserve-nixl       `pdserve up --kv-transport nixl`: KV written into decode's blocks by NIXL, not pushed over gRPC
  pdserve-1p2d       `pdserve up --decode-replicas 2`: one prefill and two decode instances (decode cores shared)
  pdserve-2p1d       `pdserve up --prefill-replicas 2`: two prefill instances (prefill cores shared), one decode
  pdserve-unified    one engine, one step loop on every core: the decode tier prefills every prompt itself, in
                     chunks of at most 256 tokens between its decode steps (`--local-prefill-tokens` past any
                     prompt, `--step-prefill-tokens 256`: chunked prefill as vLLM and Sarathi-Serve schedule it);
                     the stack's prefill process stays idle
  llama.cpp          llama-cpp-python on the GGUF file itself (pdserve/bench/llama_cpp_peer.py), when installed
  llama-server       llama.cpp's own server on the GGUF file, batching continuously over its slots
                     (pdserve/bench/llama_server.py), when built (`make llama-server`) or on PATH
Each runs as child processes pinned to the cores given (prefill and decode cores apart for pdserve; their
union for the single-process peers, so every peer gets the same cores in total) and is stopped after its runs.
Every pdserve stack gets the same KV pool size when one is given (`--kv-blocks`), so pdserve and pdserve-upfront
differ only in how decode grows a sequence's KV.
"""

import dataclasses
import importlib.util
import os
import sys
from collections.abc import Callable

from pdserve.bench import llama_server
from pdserve.bench.peer_process import (
    PeerOptions,
    PeerUnavailable,
    RunningPeer,
    cpus_text,
    launch,
)
from pdserve.certs import ensure_certs, gateway_identity
from pdserve.launcher import free_port

# pdserve peers whose decode tier runs apart, on the decode cores alone.
DISAGGREGATED = frozenset({"pdserve", "pdserve-fp16", "pdserve-bf16", "pdserve-spec", "pdserve-draft",
                           "pdserve-no-prefix-cache",
                           "pdserve-no-local-prefill", "pdserve-upfront", "pdserve-nixl", "pdserve-1p2d",
                           "pdserve-2p1d"})

# Peers whose Generate takes prompt_token_ids only (no tokenizer, no chat template): text workloads skip them.
TOKEN_IDS_ONLY = frozenset({"hf-static", "llama.cpp", "llama-server"})


def _cpu_flags(options: PeerOptions, colocated: bool) -> list[str]:
    tiers = {"gateway": options.gateway_cpus}
    tiers |= {"colocated": options.engine_cpus} if colocated else {"prefill": options.prefill_cpus,
                                                                    "decode": options.decode_cpus}
    return [arg for tier, cpus in tiers.items() if cpus for arg in (f"--{tier}-cpus", cpus_text(cpus))]


# pdserve-spec's only difference from pdserve: everything else (cores, batch limit, defaults) is the same.
SPECULATIVE_FLAGS = ("--speculative", "prompt-lookup")


def stack_command(options: PeerOptions, ports: dict[str, int], colocated: bool,
                  extra: tuple[str, ...] = ()) -> list[str]:
    """The `pdserve up` command line of a stack peer on the given gateway, prefill and decode ports."""
    return [sys.executable, "-m", "pdserve.cli", "up", "--model", str(options.model_dir), "--host", options.host,
            "--port", str(ports["gateway"]), "--prefill-port", str(ports["prefill"]),
            "--decode-port", str(ports["decode"]), "--max-batch-size", str(options.max_batch_size),
            "--metrics-port", "0", "--http-port", "0",  # no fixed ports but these three: stacks run side by side
            *(["--certs-dir", str(options.certs_dir)] if options.certs_dir else ["--insecure"]),
            "--prefill-weights", options.weights, "--decode-weights", options.weights,
            *(["--kv-blocks", str(options.kv_blocks)] if options.kv_blocks else []), "--kv-dtype", options.kv_dtype,
            *(["--colocated"] if colocated else []), *_cpu_flags(options, colocated), *extra]


def start_stack(name: str, options: PeerOptions, colocated: bool, extra: tuple[str, ...] = ()) -> RunningPeer:
    host = options.host
    ports = {tier: free_port(host) for tier in ("gateway", "prefill", "decode")}
    command = stack_command(options, ports, colocated, extra)
    addresses = {tier: f"{host}:{port}" for tier, port in ports.items()}
    if colocated:
        label = f"prefill+decode {cpus_text(options.engine_cpus)}"
    else:
        label = f"prefill {cpus_text(options.prefill_cpus)}, decode {cpus_text(options.decode_cpus)}"
    label += f", gateway {cpus_text(options.gateway_cpus)}"
    # the launcher makes the certificates too; made here first, the wait can use them from the start
    tls = gateway_identity(ensure_certs(options.certs_dir).ca.parent) if options.certs_dir else None
    # the launcher pins its children; the launcher process itself only waits
    return launch(name, command, options, list(addresses.values()), addresses["gateway"], addresses["decode"],
                   None, label, tls)


def start_pdserve(options: PeerOptions) -> RunningPeer:
    return start_stack("pdserve", options, colocated=False)


def weights_of(name: str, options: PeerOptions) -> str:
    """The weights a peer serves: a pdserve weight format name, "fp32" for hf-static, "gguf" for llama.cpp."""
    return {"hf-static": "fp32", "llama.cpp": "gguf", "llama-server": "gguf",
            "pdserve-fp16": "fp16", "pdserve-bf16": "bf16"}.get(name, options.weights)


def start_pdserve_fp16(options: PeerOptions) -> RunningPeer:
    return start_stack("pdserve-fp16", dataclasses.replace(options, weights="fp16"), colocated=False)


def _fixed_k(options: PeerOptions) -> tuple[str, ...]:
    return ("--speculative-fixed-k",) if options.fixed_k else ()


def start_pdserve_bf16(options: PeerOptions) -> RunningPeer:
    return start_stack("pdserve-bf16", dataclasses.replace(options, weights="bf16"), colocated=False)


def start_pdserve_spec(options: PeerOptions) -> RunningPeer:
    return start_stack("pdserve-spec", options, colocated=False, extra=SPECULATIVE_FLAGS + _fixed_k(options))


def start_pdserve_draft(options: PeerOptions) -> RunningPeer:
    draft = options.draft_model
    if draft is None or not (draft / "config.json").exists():
        raise PeerUnavailable(f"no draft model at {draft}; train one with `pdserve distill-draft` or pass --draft-model")
    return start_stack("pdserve-draft", options, colocated=False,
                       extra=("--speculative", "draft", "--draft-model", str(draft), *_fixed_k(options)))


# What each issue-16 peer changes from pdserve: prefix caching, conditional disaggregation, lazy KV growth.
NO_PREFIX_CACHE_FLAGS = ("--no-prefix-caching",)
NO_LOCAL_PREFILL_FLAGS = ("--local-prefill-tokens", "0")
UPFRONT_FLAGS = ("--kv-growth", "upfront")
NIXL_FLAGS = ("--kv-transport", "nixl")
# The prefill:decode ratio: every replica of a tier on that tier's cores (--prefill-cpus / --decode-cpus).
RATIO_FLAGS = {"pdserve-1p2d": ("--decode-replicas", "2"), "pdserve-2p1d": ("--prefill-replicas", "2")}


def start_pdserve_no_prefix_cache(options: PeerOptions) -> RunningPeer:
    return start_stack("pdserve-no-prefix-cache", options, colocated=False, extra=NO_PREFIX_CACHE_FLAGS)


def start_pdserve_no_local_prefill(options: PeerOptions) -> RunningPeer:
    return start_stack("pdserve-no-local-prefill", options, colocated=False, extra=NO_LOCAL_PREFILL_FLAGS)


def start_pdserve_upfront(options: PeerOptions) -> RunningPeer:
    return start_stack("pdserve-upfront", options, colocated=False, extra=UPFRONT_FLAGS)


def start_pdserve_nixl(options: PeerOptions) -> RunningPeer:
    from common.kv.nixl_transport import INSTALL_HINT, nixl_installed

    if not nixl_installed():
        raise PeerUnavailable(f"NIXL is not installed: {INSTALL_HINT}. Skipped.")
    return start_stack("pdserve-nixl", options, colocated=False, extra=NIXL_FLAGS)


def start_ratio(name: str) -> Callable[[PeerOptions], RunningPeer]:
    return lambda options: start_stack(name, options, colocated=False, extra=RATIO_FLAGS[name])


# pdserve-unified: every prompt prefilled on the decode tier, a chunk of this many tokens per step.
UNIFIED_FLAGS = ("--local-prefill-tokens", "1000000", "--step-prefill-tokens", "256")


def start_unified(options: PeerOptions) -> RunningPeer:
    every_core = dataclasses.replace(options, decode_cpus=options.engine_cpus, prefill_cpus=options.engine_cpus)
    return start_stack("pdserve-unified", every_core, colocated=False, extra=UNIFIED_FLAGS)


def start_colocated(options: PeerOptions) -> RunningPeer:
    return start_stack("pdserve-colocated", options, colocated=True)


def start_hf_static(options: PeerOptions) -> RunningPeer:
    if importlib.util.find_spec("transformers") is None:
        raise PeerUnavailable("transformers is not installed (pip install -e '.[bench]')")
    address = f"{options.host}:{free_port(options.host)}"
    command = [sys.executable, "-m", "pdserve.bench.hf_static", "--model", str(options.model_dir),
               "--host", options.host, "--port", address.rsplit(":", 1)[1],
               "--max-batch-size", str(options.max_batch_size)]
    return launch("hf-static", command, options, [address], address, address, options.engine_cpus,
                   f"one process {cpus_text(options.engine_cpus)}")


def start_llama_cpp(options: PeerOptions) -> RunningPeer:
    if importlib.util.find_spec("llama_cpp") is None:
        raise PeerUnavailable("llama-cpp-python is not installed; `pip install 'llama-cpp-python'` compiles "
                              "llama.cpp from source (about 25 minutes on 2 cores). Skipped.")
    from pdserve.prepare.default_model import default_gguf_path

    address = f"{options.host}:{free_port(options.host)}"
    threads = len(options.engine_cpus) if options.engine_cpus else 0
    command = [sys.executable, "-m", "pdserve.bench.llama_cpp_peer", "--gguf", str(default_gguf_path()),
               "--host", options.host, "--port", address.rsplit(":", 1)[1], "--threads", str(threads)]
    return launch("llama.cpp", command, options, [address], address, address, options.engine_cpus,
                   f"one process {cpus_text(options.engine_cpus)}")


def start_llama_server(options: PeerOptions) -> RunningPeer:
    binary = llama_server.find_llama_server()
    if binary is None:
        raise PeerUnavailable("llama-server is not built here: `make llama-server` builds llama.cpp's server from "
                              "source once (about 15 minutes on 2 cores), or put one on PATH. Skipped.")
    from pdserve.prepare.default_model import default_gguf_path

    port = free_port(options.host)
    address = f"{llama_server.SCHEME}{options.host}:{port}"
    threads = len(options.engine_cpus) if options.engine_cpus else 0
    command = llama_server.server_command(binary, default_gguf_path(), options.host, port, threads,
                                          options.llama_server_slots, options.context_per_slot)
    # llama.cpp's OpenMP threads as a user runs them: without the OMP_WAIT_POLICY=PASSIVE pdserve sets for its own
    # processes (inherited here, it makes every barrier sleep: 37 ms a token at batch 1 instead of 10).
    env = {key: value for key, value in os.environ.items() if key != "OMP_WAIT_POLICY"}
    return launch("llama-server", command, options, [address], address, None, options.engine_cpus,
                   f"one process {cpus_text(options.engine_cpus)}", ready=lambda: llama_server.is_ready(address),
                   env=env)


PEERS: dict[str, Callable[[PeerOptions], RunningPeer]] = {
    "hf-static": start_hf_static,
    "pdserve-colocated": start_colocated,
    "pdserve-unified": start_unified,
    "pdserve": start_pdserve,
    "pdserve-fp16": start_pdserve_fp16,
    "pdserve-bf16": start_pdserve_bf16,
    "pdserve-spec": start_pdserve_spec,
    "pdserve-draft": start_pdserve_draft,
    "pdserve-no-prefix-cache": start_pdserve_no_prefix_cache,
    "pdserve-no-local-prefill": start_pdserve_no_local_prefill,
    "pdserve-upfront": start_pdserve_upfront,
    "pdserve-nixl": start_pdserve_nixl,
    "pdserve-1p2d": start_ratio("pdserve-1p2d"),
    "pdserve-2p1d": start_ratio("pdserve-2p1d"),
    "llama.cpp": start_llama_cpp,
    "llama-server": start_llama_server,
}
