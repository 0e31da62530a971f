"""Checks that each Triton kernel equals its torch reference, on a given device.

Shared by the interpreter tests (CPU, TRITON_INTERPRET=1, set before this module is imported) and the
compiled run on CUDA (tests/common/kernels/compiled_on_cuda.py). Every check builds its inputs from a seed, and
every reference is also checked against an independent construction (torch SDPA, dense weights built from
known integer codes).
"""

import torch
import torch.nn.functional as F

from common.kernels.paged_attention import (
    paged_attention_decode,
    paged_attention_decode_reference,
)
from common.kernels.quant_matmul import (
    int4_matmul,
    int4_matmul_reference,
    int8_matmul,
    int8_matmul_reference,
)
from common.kv.quant import quantise


def _paged_inputs(device, kv_dtype, *, num_heads=6, num_kv_heads=2, head_dim=16, block_size=4,
                  context_lens=(1, 7, 13), num_blocks=16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    slots = num_blocks * block_size
    key = torch.randn(slots, num_kv_heads, head_dim, generator=gen).to(device, kv_dtype)
    value = torch.randn(slots, num_kv_heads, head_dim, generator=gen).to(device, kv_dtype)
    q = torch.randn(len(context_lens), num_heads, head_dim, generator=gen).to(device)
    order = torch.randperm(num_blocks, generator=gen)  # scattered, distinct blocks per sequence
    max_blocks = max(-(-n // block_size) for n in context_lens)
    tables = torch.zeros(len(context_lens), max_blocks, dtype=torch.int32)
    used = 0
    for row, n in enumerate(context_lens):
        count = -(-n // block_size)
        tables[row, :count] = order[used:used + count].to(torch.int32)
        used += count
    lens = torch.tensor(context_lens, dtype=torch.int32)
    return q, key, value, tables.to(device), lens.to(device), block_size, head_dim**-0.5


def check_paged_attention_reference_equals_sdpa() -> None:
    q, key, value, tables, lens, block_size, scale = _paged_inputs("cpu", torch.float32)
    expected = paged_attention_decode_reference(q, key, value, tables, lens, block_size, scale)
    for seq, n in enumerate(lens.tolist()):
        blocks = tables[seq].long()
        slots = torch.cat([torch.arange(b * block_size, (b + 1) * block_size) for b in blocks.tolist()])[:n]
        k = key[slots].transpose(0, 1)  # (kv_heads, context, head_dim)
        v = value[slots].transpose(0, 1)
        out = F.scaled_dot_product_attention(q[seq][:, None], k, v, scale=scale, enable_gqa=True)[:, 0]
        torch.testing.assert_close(expected[seq], out, atol=1e-5, rtol=1e-5)


def check_paged_attention(device: str, kv_dtype: torch.dtype, **shape) -> None:
    inputs = _paged_inputs(device, kv_dtype, **shape)
    out = paged_attention_decode(*inputs)
    expected = paged_attention_decode_reference(*inputs)
    torch.testing.assert_close(out, expected, atol=2e-5, rtol=2e-5)


def check_paged_attention_quantised(device: str, kv_dtype: torch.dtype, **shape) -> None:
    """A quantised pool (codes plus (slots, kv_heads) scales) against the reference on the same pool, which
    in turn equals the float reference on codes * scales built by plain multiplication."""
    q, key, value, tables, lens, block_size, scale = _paged_inputs(device, torch.float32, **shape)
    (key_codes, key_scale), (value_codes, value_scale) = quantise(key, kv_dtype), quantise(value, kv_dtype)
    out = paged_attention_decode(q, key_codes, value_codes, tables, lens, block_size, scale, key_scale, value_scale)
    expected = paged_attention_decode_reference(q, key_codes, value_codes, tables, lens, block_size, scale,
                                                key_scale, value_scale)
    torch.testing.assert_close(out, expected, atol=2e-5, rtol=2e-5)
    dense_key = key_codes.float() * key_scale[..., None]  # (slots, kv_heads, head_dim)
    dense_value = value_codes.float() * value_scale[..., None]
    torch.testing.assert_close(expected, paged_attention_decode_reference(q, dense_key, dense_value, tables, lens,
                                                                          block_size, scale), atol=1e-6, rtol=1e-6)


def check_int8_matmul(device: str, x_dtype: torch.dtype = torch.float32, m=5, n=48, k=96, **blocks) -> None:
    gen = torch.Generator().manual_seed(1)
    codes = torch.randint(-127, 128, (n, k), generator=gen, dtype=torch.int8)
    scales = torch.rand(n, generator=gen) * 0.02 + 0.001
    x = torch.randn(m, k, generator=gen)
    dense = codes.float() * scales[:, None]  # the weight the codes stand for, built without the code under test
    expected_cpu = F.linear(x, dense)
    torch.testing.assert_close(int8_matmul_reference(x, codes, scales), expected_cpu, atol=1e-5, rtol=1e-5)
    out = int8_matmul(x.to(device, x_dtype), codes.to(device), scales.to(device), **blocks)
    tol = 1e-4 if x_dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.float().cpu(), expected_cpu, atol=tol, rtol=tol)


def check_int4_matmul(device: str, x_dtype: torch.dtype = torch.float32, m=3, n=40, k=72, group_size=32,
                      **blocks) -> None:
    gen = torch.Generator().manual_seed(2)
    num_groups = -(-k // group_size)
    codes = torch.randint(0, 16, (n, k), generator=gen, dtype=torch.uint8)
    scales = torch.rand(n, num_groups, generator=gen) * 0.02 + 0.001
    mins = -torch.rand(n, num_groups, generator=gen) * 0.1
    dense = torch.empty(n, k)
    for col in range(k):  # element by element from the layout's definition
        dense[:, col] = codes[:, col].float() * scales[:, col // group_size] + mins[:, col // group_size]
    packed = codes[:, : k // 2] | (codes[:, k // 2:] << 4)  # byte j: k = j low, k = j + K/2 high
    x = torch.randn(m, k, generator=gen)
    expected_cpu = F.linear(x, dense)
    torch.testing.assert_close(int4_matmul_reference(x, packed, scales, mins, group_size), expected_cpu,
                               atol=1e-5, rtol=1e-5)
    out = int4_matmul(x.to(device, x_dtype), packed.to(device), scales.to(device), mins.to(device), group_size,
                      **blocks)
    tol = 1e-4 if x_dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.float().cpu(), expected_cpu, atol=tol, rtol=tol)
