"""Quantised KV pools (int8, fp8 e4m3): error bounds of the round trip against an independent float64
reference, reads that equal dequantising the whole pool, rows stored unchanged, and sizes with scales."""

import pytest
import torch

from common.kv.pool import KvPool
from common.kv.quant import KvRows, dequantise, quantise

FP8 = torch.float8_e4m3fn
LAYERS, BLOCKS, BLOCK_SIZE, HEADS, HEAD_DIM = 2, 6, 4, 3, 16


def kv_rows(tokens: int, seed: int = 0) -> torch.Tensor:
    """(tokens, HEADS, HEAD_DIM) with rows of very different magnitudes, one all-zero row, one outlier."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, HEADS, HEAD_DIM, generator=gen) * torch.logspace(-3, 3, tokens)[:, None, None]
    x[0, 1] = 0.0
    x[-1, 0, 5] = 1e4
    return x


def test_int8_round_trip_is_within_half_a_step_of_an_independent_reference():
    x = kv_rows(12)
    codes, scale = quantise(x, torch.int8)
    step = x.double().abs().amax(dim=-1) / 127  # (tokens, heads) the reference's scale
    torch.testing.assert_close(scale.double(), step, rtol=1e-6, atol=0)
    error = (dequantise(codes, scale).double() - x.double()).abs()
    assert (error <= step[..., None] / 2 * (1 + 1e-5) + 1e-30).all()
    assert codes.abs().max() == 127 and codes.dtype == torch.int8
    assert torch.equal(dequantise(codes, scale)[0, 1], torch.zeros(HEAD_DIM))  # a zero row stays zero


def test_fp8_round_trip_is_within_e4m3_rounding_of_an_independent_reference():
    x = kv_rows(12)
    codes, scale = quantise(x, FP8)
    step = x.double().abs().amax(dim=-1) / 448  # (tokens, heads)
    error = (dequantise(codes, scale).double() - x.double()).abs()
    # e4m3 keeps 3 mantissa bits: relative error <= 2**-4 for normals; spacing 2**-9 (times scale) below 2**-6.
    bound = torch.maximum(x.double().abs() * 2**-4, step[..., None] * 2**-10) * (1 + 1e-5)
    assert (error <= bound).all()
    assert codes.float().abs().max() == 448 and codes.dtype == FP8


@pytest.mark.parametrize("dtype", [torch.int8, FP8])
def test_dequantise_equals_torchs_own_cast_for_every_code(dtype):
    codes = torch.arange(256, dtype=torch.uint8).view(dtype)[:, None]  # every byte, one per row
    if dtype == FP8:
        codes = codes[~codes.float().isnan()[:, 0]]  # quantise never makes NaN codes
    scale = torch.rand(codes.shape[0]) * 10
    assert torch.equal(dequantise(codes, scale), codes.float() * scale[:, None])


def make_pool(dtype: torch.dtype) -> KvPool:
    return KvPool(num_layers=LAYERS, num_blocks=BLOCKS, block_size=BLOCK_SIZE, num_kv_heads=HEADS,
                  head_dim=HEAD_DIM, dtype=dtype)


def filled_pool(dtype: torch.dtype) -> KvPool:
    pool = make_pool(dtype)
    slots = torch.randperm(BLOCKS * BLOCK_SIZE, generator=torch.Generator().manual_seed(1))
    for layer in range(LAYERS):
        pool.write(layer, slots, kv_rows(len(slots), seed=layer), kv_rows(len(slots), seed=10 + layer) * 0.5)
    return pool


@pytest.mark.parametrize("dtype", [torch.int8, FP8])
def test_read_blocks_equals_dequantising_the_whole_pool(dtype):
    pool = filled_pool(dtype)
    tables = torch.tensor([[4, 1, 5], [0, 2, 2]])  # (batch, blocks)
    for layer in range(LAYERS):
        whole_key = pool.key[layer].float() * pool.key_scale[layer][..., None]  # (slots, heads, head_dim)
        whole_value = pool.value[layer].float() * pool.value_scale[layer][..., None]
        slots = (tables[..., None] * BLOCK_SIZE + torch.arange(BLOCK_SIZE)).reshape(2, -1)  # (batch, context)
        key, value = pool.read_blocks(layer, tables)
        assert key.dtype == torch.float32 and key.shape == (2, 3 * BLOCK_SIZE, HEADS, HEAD_DIM)
        assert torch.equal(key, whole_key[slots]) and torch.equal(value, whole_value[slots])
        some = torch.tensor([7, 0, 23, 7])
        key, value = pool.read_slots(layer, some)
        assert torch.equal(key, whole_key[some]) and torch.equal(value, whole_value[some])


@pytest.mark.parametrize("dtype", [torch.int8, FP8])
def test_quantised_pool_stays_close_to_a_float_pool(dtype):
    quantised, exact = filled_pool(dtype), filled_pool(torch.float32)
    tables = torch.tensor([[0, 1, 2, 3, 4, 5]])
    key, _ = quantised.read_blocks(1, tables)
    reference, _ = exact.read_blocks(1, tables)
    row_max = reference.abs().amax(dim=-1, keepdim=True)  # (1, context, heads, 1)
    assert ((key - reference).abs() <= row_max * (1 / 254 if dtype == torch.int8 else 1 / 16) * 1.001).all()


@pytest.mark.parametrize("dtype", [torch.int8, FP8])
def test_rows_written_as_received_are_stored_bit_exact(dtype):
    source, target = filled_pool(dtype), make_pool(dtype)
    slots = torch.tensor([3, 9, 10, 22])
    rows = source.read_rows(0, slots)
    target.write_rows(1, torch.tensor([0, 1, 2, 3]), rows)
    again = target.read_rows(1, torch.tensor([0, 1, 2, 3]))
    for name in ("key", "value"):
        assert torch.equal(getattr(again, name).view(torch.uint8), getattr(rows, name).view(torch.uint8))
        assert torch.equal(getattr(again, name + "_scale"), getattr(rows, name + "_scale"))


def test_write_returns_what_it_stored():
    pool = make_pool(torch.int8)
    key, value = kv_rows(5), kv_rows(5, seed=3)
    stored = pool.write(0, torch.tensor([1, 2, 3, 4, 5]), key, value)
    assert isinstance(stored, KvRows) and stored.key.dtype == torch.int8 and stored.key_scale.shape == (5, HEADS)
    assert torch.equal(pool.read_rows(0, torch.tensor([1, 2, 3, 4, 5])).key, stored.key)
    assert torch.equal(stored.rows(1, 3).value_scale, stored.value_scale[1:3])


def test_float_pools_keep_the_plain_path():
    pool = make_pool(torch.float32)
    key = kv_rows(3)
    stored = pool.write(0, torch.tensor([0, 5, 9]), key, key)
    assert stored.key is key and stored.key_scale is None and pool.key_scale is None
    assert torch.equal(pool.read_slots(0, torch.tensor([5]))[0], key[1:2])


@pytest.mark.parametrize("dtype, row_bytes", [(torch.float32, 4 * HEAD_DIM), (torch.float16, 2 * HEAD_DIM),
                                              (torch.int8, HEAD_DIM + 4), (FP8, HEAD_DIM + 4)])
def test_bytes_per_block_counts_codes_and_scales(dtype, row_bytes):
    expected = 2 * LAYERS * BLOCK_SIZE * HEADS * row_bytes
    assert KvPool.bytes_per_block(num_layers=LAYERS, block_size=BLOCK_SIZE, num_kv_heads=HEADS, head_dim=HEAD_DIM,
                                  dtype=dtype) == expected
    pool = make_pool(dtype)
    held = sum(t.numel() * t.element_size() for t in (pool.key, pool.value, pool.key_scale, pool.value_scale)
               if t is not None)
    assert held == expected * BLOCKS


@pytest.mark.parametrize("dtype_name", ["float32", "float16", "bfloat16", "int8", "fp8"])
def test_bench_reports_the_bytes_per_token_the_pool_holds(dtype_name):
    from common.kv.wire import DTYPES
    from pdserve.bench.runner import kv_bytes_per_token_of

    per_token = KvPool.bytes_per_block(num_layers=30, block_size=1, num_kv_heads=3, head_dim=64,
                                       dtype=DTYPES[dtype_name])
    assert kv_bytes_per_token_of(dtype_name, 30, 3, 64) == per_token
    assert per_token == {"float32": 46_080, "float16": 23_040, "bfloat16": 23_040, "int8": 12_240,
                         "fp8": 12_240}[dtype_name]


@pytest.mark.parametrize("dtype", [torch.float32, torch.int8, torch.float8_e4m3fn])
@pytest.mark.parametrize("table", [[3, 4, 5, 6], [6, 2, 4, 0]], ids=["run", "scattered"])
def test_rows_in_place_are_the_rows_read_back(dtype, table):
    """Views of the pool where a sequence's blocks are a run, gathered otherwise: the same rows either way, and
    a NaN written anywhere in the range is seen (what decode checks NIXL writes with)."""
    pool = KvPool(num_layers=2, num_blocks=8, block_size=4, num_kv_heads=2, head_dim=8, dtype=dtype)
    for layer in range(2):
        pool.write(layer, pool.slots(list(range(8)), 0, 32), torch.randn(32, 2, 8), torch.randn(32, 2, 8))
    for start, end in ((0, 16), (3, 13), (5, 6)):
        got, want = pool.rows_in_place(1, table, start, end), pool.read_rows(1, pool.slots(table, start, end))
        for a, b in zip((got.key, got.value, got.key_scale, got.value_scale),
                        (want.key, want.value, want.key_scale, want.value_scale)):
            assert (a is None and b is None) or torch.equal(a.view(torch.uint8), b.view(torch.uint8))
    if dtype == torch.float32:
        pool.value[1, table[2] * 4 + 1, 1, 5] = float("nan")
        assert not pool.rows_in_place(1, table, 3, 13).all_finite() and pool.rows_in_place(1, table, 0, 8).all_finite()
