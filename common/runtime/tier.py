"""What both model tiers build at start-up: the model, a KV pool sized by a memory budget, the block
manager over it, the runner, and the compatibility fingerprint."""

import logging
from dataclasses import dataclass

import torch

from common.basics.compat import Compat, compat_for
from common.basics.config import DecodeConfig, TierConfig, resolve_threads
from common.kv.block_manager import BlockManager
from common.kv.pool import KvPool
from common.kv.prefix import root_hash
from common.kv.wire import DTYPES
from common.model.llama import LlamaModel
from common.model.runner import ModelRunner
from common.model.weights import load_model, stored_weight_bytes
from common.runtime.cpu_paths import DECODE_ROWS, PREFILL_ROWS, choose_layout
from common.runtime.machine import describe_machine

log = logging.getLogger(__name__)


@dataclass
class TierRuntime:
    runner: ModelRunner
    blocks: BlockManager
    compat: Compat


def build_runtime(config: TierConfig) -> TierRuntime:
    # Once per tier, first: its logs then say which CPU's kernels (and GPU) every later figure came from.
    log.info("machine: %s", describe_machine())
    torch.set_num_threads(resolve_threads(config.threads))
    if not (config.model_dir / "config.json").exists():
        raise FileNotFoundError(
            f"no model at {config.model_dir}: run `pdserve prepare-model` or pass --model with a Hugging Face "
            "checkpoint directory (config.json, *.safetensors, tokenizer.json)"
        )
    model = load_model(config.model_dir, config.weights, resolve_device(config.device))
    layout = config.cpu_weight_layout
    if layout == "auto":  # off CPU nothing gets a copy: there is nothing to choose
        choice = choose_layout(model, config.weights, DECODE_ROWS if isinstance(config, DecodeConfig) else PREFILL_ROWS)
        layout = choice.layout if choice else "single"
        if choice:
            log.info("%s; --cpu-weight-layout dual|single forces one", choice.describe())
    if layout == "dual":
        single = stored_weight_bytes(model)["total"]
        if model.add_blocked_copies():
            log.info("weights %.1f MiB, %.1f MiB with the copies for the CPU's faster products "
                     "(--cpu-weight-layout single keeps one copy)", single / 2**20,
                     stored_weight_bytes(model)["total"] / 2**20)
    compat = compat_for(config.model_dir, model.config, kv_dtype=config.kv_dtype, block_size=config.block_size)
    return runtime_for(model, config, compat)


def runtime_for(model: LlamaModel, config: TierConfig, compat: Compat) -> TierRuntime:
    """A KV pool sized by config's memory budget, its block manager, and a runner over `model`."""
    c = model.config
    kv_dtype = DTYPES[config.kv_dtype]
    per_block = KvPool.bytes_per_block(num_layers=c.num_layers, block_size=config.block_size,
                                       num_kv_heads=c.num_kv_heads, head_dim=c.head_dim, dtype=kv_dtype)
    num_blocks = config.kv_blocks or config.kv_memory_mb * 2**20 // per_block
    if num_blocks < 1:
        raise ValueError(f"kv_memory_mb {config.kv_memory_mb} holds no block of {per_block} bytes; raise it")
    kv = KvPool(num_layers=c.num_layers, num_blocks=num_blocks, block_size=config.block_size,
                num_kv_heads=c.num_kv_heads, head_dim=c.head_dim, dtype=kv_dtype, device=model.device)
    blocks = BlockManager(num_blocks, config.block_size, prefix_root=root_hash(compat.fingerprint)
                          if config.prefix_caching else None)
    return TierRuntime(ModelRunner(model, kv), blocks, compat)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: this machine has no CUDA device; use --device cpu")
    return torch.device(name)
