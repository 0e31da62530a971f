"""The model's decode through the Triton paged-attention kernel (what CUDA serves one-token steps with), run
by triton's interpreter on CPU tensors, against the torch paths (per sequence, padded groups) and transformers
in float64: a batch of sequences of different lengths in scattered blocks, one of them starting a new block,
blocks reserved past their contexts, over a float32 and an int8 pool.

The interpreter runs only in a session that set TRITON_INTERPRET before triton was first imported
(tests/conftest.py does without CUDA); with CUDA the same path runs compiled, in a process of its own
(tests/common/kernels/compiled_on_cuda.py)."""

import os

import pytest
import torch
from bounds import assert_logits_match, decoder_tolerance

from common.kv.pool import KvPool
from common.model.llama import LlamaModel
from common.model.runner import DecodeItem, ModelRunner, PrefillChunk

pytestmark = [pytest.mark.kernels,
              pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                 reason="the kernel runs on CPU tensors only interpreted (TRITON_INTERPRET=1 from the "
                                        "session's start); with CUDA, compiled_on_cuda.py runs this path")]

BLOCK_SIZE = 4
PROMPTS = ("Hi", "A longer prompt, with more tokens", "Numbers: 1 2 3")  # 1, 7 and 8 tokens
TABLES = ([9, 2, 13], [5, 11, 0, 7, 1], [3, 14, 6, 8])  # scattered, each with blocks reserved past its context
NEXT_TOKENS = (7, 8, 9)


@pytest.fixture(scope="module")
def model(model_dir):
    return LlamaModel.load(model_dir)


@pytest.fixture(scope="module")
def prompts(tokenizer):
    ids = [tokenizer.encode(text) for text in PROMPTS]
    assert any(len(p) % BLOCK_SIZE == 0 for p in ids)  # the case under test: a token starting a new block
    return ids


def decode(model: LlamaModel, prompts: list[list[int]], attention: str, kv_dtype: torch.dtype) -> ModelRunner:
    c = model.config
    runner = ModelRunner(model, KvPool(num_layers=c.num_layers, num_blocks=16, block_size=BLOCK_SIZE,
                                       num_kv_heads=c.num_kv_heads, head_dim=c.head_dim, dtype=kv_dtype),
                         attention=attention)
    runner.run_prefill([PrefillChunk(ids, 0, list(table)) for ids, table in zip(prompts, TABLES)])
    return runner


def items(prompts: list[list[int]]) -> list[DecodeItem]:
    return [DecodeItem(token, len(ids), list(table)) for token, ids, table in zip(NEXT_TOKENS, prompts, TABLES)]


@pytest.fixture(scope="module")
def exact(hf_model_f64, prompts) -> torch.Tensor:
    """transformers in float64: (sequences, vocab) logits after each sequence's next token."""
    with torch.no_grad():
        return torch.stack([hf_model_f64(torch.tensor([ids + [token]])).logits[0, -1]
                            for ids, token in zip(prompts, NEXT_TOKENS)])


def test_kernel_decode_over_a_float32_pool_matches_torch_paths_and_transformers(model, prompts, exact):
    runners = {path: decode(model, prompts, path, torch.float32) for path in ("paged-kernel", "per-sequence", "groups")}
    logits = {path: runner.run_decode(items(prompts)) for path, runner in runners.items()}
    for row in range(len(prompts)):
        tolerance = decoder_tolerance(model.config, exact[row])
        assert_logits_match(logits["paged-kernel"][row], exact[row], tolerance)
        for path in ("per-sequence", "groups"):  # each within tolerance of the exact logits
            assert_logits_match(logits["paged-kernel"][row], logits[path][row], 2 * tolerance)


def test_a_step_with_drafts_on_the_kernel_path_takes_the_groups_and_matches_transformers(model, prompts,
                                                                                         hf_model_f64):
    """Several query tokens for one sequence do not fit the kernel: that step runs as padded groups."""
    runner = decode(model, prompts, "paged-kernel", torch.float32)
    steps = [DecodeItem(NEXT_TOKENS[0], len(prompts[0]), list(TABLES[0]), draft_ids=(11, 12)),
             DecodeItem(NEXT_TOKENS[1], len(prompts[1]), list(TABLES[1]))]
    batch = runner._decode_batch(steps)
    assert batch.paged is None and batch.groups  # the case under test
    out = runner.run_decode(steps)  # (3 + 1, vocab)
    with torch.no_grad():
        first = hf_model_f64(torch.tensor([prompts[0] + [NEXT_TOKENS[0], 11, 12]])).logits[0, -3:]
        second = hf_model_f64(torch.tensor([prompts[1] + [NEXT_TOKENS[1]]])).logits[0, -1]
    assert_logits_match(out[:3], first, decoder_tolerance(model.config, first))
    assert_logits_match(out[3], second, decoder_tolerance(model.config, second))



def test_kernel_decode_over_an_int8_pool_matches_torch_paths(model, prompts, exact):
    """The new token's K and V are computed in float32 by each path, rounded differently, so now and then a
    code near a rounding boundary lands on the other side of it (0.05 logits here): the logits are held to what
    int8 KV costs, the float32 bound plus twice the per-sequence path's departure from the unquantised
    logits. Attention itself, on the very same codes, must agree as float32 arithmetic does."""
    kernel = decode(model, prompts, "paged-kernel", torch.int8)
    got = kernel.run_decode(items(prompts))
    per_sequence = decode(model, prompts, "per-sequence", torch.int8).run_decode(items(prompts))
    for row in range(len(prompts)):
        effect = float((per_sequence[row] - exact[row]).abs().max())
        assert_logits_match(got[row], exact[row], decoder_tolerance(model.config, exact[row]) + 2 * effect)

    c = model.config
    q = torch.randn(len(prompts), c.num_heads, c.head_dim, generator=torch.Generator().manual_seed(0))
    for layer in (0, c.num_layers - 1):  # the pool kernel decoded into, read through each path
        out = {path: model.decode_attention.for_batch(ModelRunner(model, kernel.kv, attention=path)._decode_batch(
            items(prompts)), kernel.kv)(layer, q) for path in ("paged-kernel", "per-sequence", "groups")}
        for path in ("per-sequence", "groups"):
            torch.testing.assert_close(out["paged-kernel"], out[path], atol=1e-5, rtol=1e-5)
