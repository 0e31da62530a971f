"""What the micro-benchmarks in this folder share: the default model on one torch thread, a runner over a
float32 KV pool of 16-token blocks, and batches of decode items with their own block tables."""

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

from common.basics.config import default_model_dir  # noqa: E402
from common.kv.pool import KvPool  # noqa: E402
from common.model.runner import DecodeItem, ModelRunner  # noqa: E402
from common.model.weights import load_model  # noqa: E402
from common.runtime.machine import describe_machine  # noqa: E402

BLOCK_SIZE = 16
MODEL_DIR = default_model_dir(os.environ.get("XDG_CACHE_HOME"), os.path.expanduser("~"))


def print_machine() -> None:
    """What each micro-benchmark prints first: its figures hold for this CPU's kernels (and GPU) only."""
    print(f"machine: {describe_machine()}", flush=True)


def default_runner(num_blocks: int, weights: str = "fp32") -> ModelRunner:
    torch.set_num_threads(1)
    model = load_model(MODEL_DIR, weights)
    c = model.config
    kv = KvPool(num_layers=c.num_layers, num_blocks=num_blocks, block_size=BLOCK_SIZE, num_kv_heads=c.num_kv_heads,
                head_dim=c.head_dim, dtype=torch.float32)
    return ModelRunner(model, kv)


def decode_items(batch: int, context: int, drafts: int = 0) -> list[DecodeItem]:
    """batch sequences at `context` tokens, each verifying `drafts` speculated tokens."""
    n = -(-(context + 1 + drafts) // BLOCK_SIZE)
    return [DecodeItem(100 + b, context, list(range(b * n, b * n + n)), draft_ids=tuple(range(200, 200 + drafts)))
            for b in range(batch)]
