"""The same model on a CUDA device gives the CPU's logits (runs where CUDA exists; skipped elsewhere).

On CUDA decode runs the torch padded-groups path here: this process may hold triton defined for the
interpreter (tests/common/kernels/test_kernels_interpret.py), so the paged kernel, CUDA's default for one-token
steps, is checked compiled in a process of its own (tests/common/kernels/compiled_on_cuda.py)."""

import pytest
import torch

from common.kv.pool import KvPool
from common.model.llama import LlamaModel
from common.model.runner import DecodeItem, ModelRunner, PrefillChunk

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def _runner(model_dir, device: str) -> ModelRunner:
    model = LlamaModel.load(model_dir, torch.float32, device)
    c = model.config
    return ModelRunner(model, KvPool(num_layers=c.num_layers, num_blocks=32, block_size=16,
                                     num_kv_heads=c.num_kv_heads, head_dim=c.head_dim, dtype=torch.float32,
                                     device=device), attention="groups" if device == "cuda" else None)


def test_cuda_prefill_and_decode_match_cpu(model_dir):
    ids = list(range(100, 140))
    results = []
    for device in ("cpu", "cuda"):
        runner = _runner(model_dir, device)
        prefill = runner.run_prefill([PrefillChunk(ids, 0, [3, 1, 4])])
        decode = runner.run_decode([DecodeItem(42, len(ids), [3, 1, 4])])
        results.append((prefill.cpu(), decode.cpu()))
    torch.testing.assert_close(results[1][0], results[0][0], atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(results[1][1], results[0][1], atol=1e-3, rtol=1e-3)
