"""The project's Llama over a paged KV pool against Hugging Face transformers on the same weights:
chunked prefill into scattered blocks, and batched decode of sequences of different lengths, through both
torch decode attention paths (per sequence, in place or gathered; padded groups).

The reference is transformers in float64; our float32 logits must be within the decoder's rounding bound
(tests/bounds.py: num_layers sqrt(K) u max|logit|, about 2e-3 here) and rank the top tokens as it does."""

import pytest
import torch
from bounds import assert_logits_match, decoder_tolerance

from common.kv.pool import KvPool
from common.model.llama import LlamaModel
from common.model.runner import DecodeItem, ModelRunner, PrefillChunk


@pytest.fixture(scope="module")
def model(model_dir):
    return LlamaModel.load(model_dir)


@pytest.fixture(scope="module", params=["per-sequence", "groups"])
def runner(model, request):
    """Both torch decode attention paths: per sequence (what CPU serves with) and padded groups (what CUDA does
    for steps with drafts); the paged kernel's path is test_paged_kernel_decode.py's."""
    c = model.config
    kv = KvPool(num_layers=c.num_layers, num_blocks=64, block_size=4, num_kv_heads=c.num_kv_heads,
                head_dim=c.head_dim, dtype=torch.float32)
    return ModelRunner(model, kv, attention=request.param)


@pytest.fixture(scope="module")
def reference(hf_model, hf_model_f64):
    tokenizer = hf_model[1]

    def logits(token_ids: list[int]) -> torch.Tensor:
        with torch.no_grad():
            return hf_model_f64(torch.tensor([token_ids])).logits[0]  # (tokens, vocab) float64

    return logits, tokenizer


def assert_close(got: torch.Tensor, expected: torch.Tensor, config) -> None:
    assert_logits_match(got, expected, decoder_tolerance(config, expected))


def test_chunked_prefill_into_scattered_blocks_matches_reference(runner, reference):
    logits, tokenizer = reference
    ids = tokenizer("The quick brown fox jumps over the lazy dog because it was in a hurry to get home").input_ids
    blocks = [9, 2, 17, 5, 30, 11]  # deliberately out of order
    expected = logits(ids)
    first = runner.run_prefill([PrefillChunk(ids[:7], 0, blocks)])
    second = runner.run_prefill([PrefillChunk(ids[7:], 7, blocks)])
    assert_close(first[0], expected[6], runner.model.config)
    assert_close(second[0], expected[-1], runner.model.config)


def test_batched_decode_of_different_lengths_matches_reference(runner, reference):
    logits, tokenizer = reference
    prompts = [tokenizer(t).input_ids for t in ("Hi", "A much longer prompt with several more tokens in it", "Numbers: 1 2 3")]
    tables = [[40, 41, 42, 43, 44], [45, 46, 47, 48, 49, 50, 51, 52], [53, 54, 55, 56, 57]]
    runner.run_prefill([PrefillChunk(ids, 0, table) for ids, table in zip(prompts, tables)])
    next_tokens = [7, 8, 9]
    out = runner.run_decode([DecodeItem(tok, len(ids), table) for tok, ids, table in zip(next_tokens, prompts, tables)])
    for row, (ids, tok) in enumerate(zip(prompts, next_tokens)):
        assert_close(out[row], logits(ids + [tok])[-1], runner.model.config)


def test_decode_with_speculated_tokens_matches_reference_at_every_position(runner, reference):
    logits, tokenizer = reference
    prompts = [tokenizer(t).input_ids for t in ("Speculate about", "One two three four five six")]
    tables = [[58, 59, 60, 61, 62], [63, 0, 1, 2, 3]]
    runner.run_prefill([PrefillChunk(ids, 0, table) for ids, table in zip(prompts, tables)])
    items = [DecodeItem(11, len(prompts[0]), tables[0], draft_ids=(12, 13, 14)),
             DecodeItem(21, len(prompts[1]), tables[1])]
    out = runner.run_decode(items)  # (4 + 1, vocab)
    assert out.shape[0] == 5
    expected_first = logits(prompts[0] + [11, 12, 13, 14])[-4:]
    assert_close(out[:4], expected_first, runner.model.config)
    assert_close(out[4], logits(prompts[1] + [21])[-1], runner.model.config)


def test_decode_reads_consecutive_blocks_in_place_and_gathers_scattered_ones(runner, reference):
    logits, tokenizer = reference
    prompts = [tokenizer(t).input_ids for t in ("Blocks in a row", "Blocks all over the pool, here and there")]
    tables = [[20, 21, 22, 23, 24, 25], [33, 26, 35, 27, 37, 28, 39, 29, 31]]
    runner.run_prefill([PrefillChunk(ids, 0, table) for ids, table in zip(prompts, tables)])
    items = [DecodeItem(7, len(prompts[0]), tables[0], draft_ids=(8,)), DecodeItem(9, len(prompts[1]), tables[1])]
    contexts = runner._seq_contexts(items)
    assert [seq.run_start for seq in contexts] == [20, None]  # the two cases under test
    out = runner.run_decode(items)  # (2 + 1, vocab)
    assert_close(out[:2], logits(prompts[0] + [7, 8])[-2:], runner.model.config)
    assert_close(out[2], logits(prompts[1] + [9])[-1], runner.model.config)


def test_decode_groups_by_length_and_ignores_reserved_blocks(runner, reference):
    """A long context among short ones is attended in its own group (no padding of the short ones to its
    length), tables carry blocks reserved for later tokens, and drafts ride along: logits still match."""
    from common.model.decode_groups import plan_groups

    logits, tokenizer = reference
    long_ids = tokenizer(" ".join(f"item {i}," for i in range(28))).input_ids  # ~100 tokens: ~25 blocks of 4
    short = [tokenizer(t).input_ids for t in ("Hello there", "Why?")]
    long_table = list(range(0, (len(long_ids) + 1 + 3) // 4 + 2))  # 2 blocks reserved for tokens to come
    assert len(long_table) <= 40
    tables = [long_table, [40, 41, 42, 43], [50, 51, 52]]
    prompts = [long_ids, *short]
    runner.run_prefill([PrefillChunk(ids, 0, table) for ids, table in zip(prompts, tables)])
    items = [DecodeItem(5, len(long_ids), tables[0]), DecodeItem(6, len(short[0]), tables[1], draft_ids=(7, 8)),
             DecodeItem(9, len(short[1]), tables[2])]
    in_use = [(item.position + item.num_tokens - 1) // 4 + 1 for item in items]
    assert len(plan_groups(in_use)) == 2  # the case under test: two gathers
    out = runner.run_decode(items)  # (1 + 3 + 1, vocab)
    assert_close(out[0], logits(long_ids + [5])[-1], runner.model.config)
    assert_close(out[1:4], logits(short[0] + [6, 7, 8])[-3:], runner.model.config)
    assert_close(out[4], logits(short[1] + [9])[-1], runner.model.config)


@pytest.mark.parametrize("kv_dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("attention", ["per-sequence", "groups"])
def test_decode_over_a_half_precision_kv_pool_matches_reference(model, reference, hf_model_f64, kv_dtype,
                                                                attention):
    """KV stored in 16 bits, attention computed in float32: the logits of transformers in float64 whose own KV
    cache rounds K and V to the same dtype (tests/kv_reference.py). Our keys, computed in float32, sit on the
    other side of a 16-bit rounding boundary from the float64 ones here and there (one unit in the last place
    instead of half of one), so the bound is the float32 decoder's plus twice the whole effect of the
    rounding, as the reference computes it."""
    from kv_reference import logits_with_rounded_kv

    logits, tokenizer = reference
    c = model.config
    runner = ModelRunner(model, KvPool(num_layers=c.num_layers, num_blocks=16, block_size=4,
                                       num_kv_heads=c.num_kv_heads, head_dim=c.head_dim, dtype=kv_dtype),
                         attention=attention)
    prompts = [tokenizer(t).input_ids for t in ("Half precision keys", "and values, in blocks")]
    tables = [[0, 1, 2, 3], [9, 5, 11, 7]]  # one run, one scattered
    runner.run_prefill([PrefillChunk(ids, 0, table) for ids, table in zip(prompts, tables)])
    out = runner.run_decode([DecodeItem(5, len(prompts[0]), tables[0]), DecodeItem(6, len(prompts[1]), tables[1])])
    for row, (ids, token) in enumerate(zip(prompts, (5, 6))):
        rounded, unrounded = logits_with_rounded_kv(hf_model_f64, ids + [token], kv_dtype)[-1], logits(ids + [token])[-1]
        rounding_effect = float((rounded - unrounded).abs().max())
        assert_logits_match(out[row], rounded, decoder_tolerance(c, rounded) + 2 * rounding_effect)
