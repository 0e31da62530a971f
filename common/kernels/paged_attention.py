"""Paged-attention decode: one query token per sequence against its KV, read in place from the paged pool.

The pool's layout (common/kv/pool.py): per layer, key and value are (slots, kv_heads, head_dim) with
slot = block * block_size + offset; a sequence's blocks are listed in its row of `block_tables`.
One program handles one (sequence, KV head) pair and all query heads of that KV head's group, so each
key/value block is read once per group; softmax runs online over the blocks (flash-decoding style).
Quantised pools (int8, fp8 e4m3) pass their scales (slots, kv_heads); each K/V row is dequantised as it is
loaded, so the codes are read in place, never copied to float.
"""

import torch
import triton
import triton.language as tl

from common.kv.quant import dequantise, is_quantised


@triton.jit
def _paged_attention_decode_kernel(
    out_ptr, q_ptr, key_ptr, value_ptr, block_tables_ptr, context_lens_ptr, scale, max_blocks,
    stride_qb, stride_qh, stride_ob, stride_oh, stride_ks, stride_kh, stride_vs, stride_vh,
    key_scale_ptr, value_scale_ptr, stride_ss,
    GROUP: tl.constexpr, GROUP_P2: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    HAS_SCALES: tl.constexpr,
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    group = tl.arange(0, GROUP_P2)
    heads = kv_head * GROUP + group  # (GROUP_P2,) query heads sharing this KV head
    head_ok = group < GROUP
    dims = tl.arange(0, HEAD_DIM)
    q = tl.load(q_ptr + seq * stride_qb + heads[:, None] * stride_qh + dims[None, :],
                mask=head_ok[:, None], other=0.0).to(tl.float32)  # (GROUP_P2, HEAD_DIM)
    context_len = tl.load(context_lens_ptr + seq)
    m_i = tl.full([GROUP_P2], float("-inf"), tl.float32)
    l_i = tl.zeros([GROUP_P2], tl.float32)
    acc = tl.zeros([GROUP_P2, HEAD_DIM], tl.float32)
    offsets = tl.arange(0, BLOCK_SIZE)
    for b in range(0, tl.cdiv(context_len, BLOCK_SIZE)):
        block = tl.load(block_tables_ptr + seq * max_blocks + b).to(tl.int64)
        slots = block * BLOCK_SIZE + offsets  # (BLOCK_SIZE,)
        valid = b * BLOCK_SIZE + offsets < context_len
        k = tl.load(key_ptr + slots[:, None] * stride_ks + kv_head * stride_kh + dims[None, :],
                    mask=valid[:, None], other=0.0).to(tl.float32)  # (BLOCK_SIZE, HEAD_DIM)
        v = tl.load(value_ptr + slots[:, None] * stride_vs + kv_head * stride_vh + dims[None, :],
                    mask=valid[:, None], other=0.0).to(tl.float32)
        if HAS_SCALES:  # one scale per (slot, kv_head): (BLOCK_SIZE,)
            k = k * tl.load(key_scale_ptr + slots * stride_ss + kv_head, mask=valid, other=0.0)[:, None]
            v = v * tl.load(value_scale_ptr + slots * stride_ss + kv_head, mask=valid, other=0.0)[:, None]
        scores = tl.sum(q[:, None, :] * k[None, :, :], axis=2) * scale  # (GROUP_P2, BLOCK_SIZE)
        scores = tl.where(valid[None, :], scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, axis=1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(scores - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v[None, :, :], axis=1)
        m_i = m_new
    out = acc / l_i[:, None]
    tl.store(out_ptr + seq * stride_ob + heads[:, None] * stride_oh + dims[None, :],
             out.to(out_ptr.dtype.element_ty), mask=head_ok[:, None])


def paged_attention_decode(q: torch.Tensor, key: torch.Tensor, value: torch.Tensor, block_tables: torch.Tensor,
                           context_lens: torch.Tensor, block_size: int, scale: float,
                           key_scale: torch.Tensor | None = None,
                           value_scale: torch.Tensor | None = None) -> torch.Tensor:
    """q (batch, heads, head_dim); key/value one layer of the pool (slots, kv_heads, head_dim);
    block_tables (batch, max_blocks) int32; context_lens (batch,) int32 >= 1; for a quantised pool, its
    key_scale/value_scale (slots, kv_heads) float32. Returns (batch, heads, head_dim)."""
    batch, num_heads, head_dim = q.shape
    num_kv_heads = key.shape[1]
    if head_dim & (head_dim - 1) or block_size & (block_size - 1):
        raise ValueError(f"head_dim ({head_dim}) and block_size ({block_size}) must be powers of two")
    if key.stride(2) != 1 or value.stride(2) != 1 or q.stride(2) != 1:
        raise ValueError("the last dimension of q, key and value must be contiguous")
    has_scales = _check_scales(key, key_scale, value_scale)
    group = num_heads // num_kv_heads
    out = torch.empty_like(q)
    tables = block_tables.to(torch.int32).contiguous()
    _paged_attention_decode_kernel[(batch, num_kv_heads)](
        out, q, key, value, tables, context_lens.to(torch.int32).contiguous(), scale, tables.shape[1],
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), key.stride(0), key.stride(1),
        value.stride(0), value.stride(1), key_scale if has_scales else q, value_scale if has_scales else q,
        num_kv_heads, GROUP=group, GROUP_P2=triton.next_power_of_2(group), HEAD_DIM=head_dim,
        BLOCK_SIZE=block_size, HAS_SCALES=has_scales,
    )
    return out


def _check_scales(key: torch.Tensor, key_scale: torch.Tensor | None, value_scale: torch.Tensor | None) -> bool:
    """Whether the pool is quantised; its scales must be contiguous float32 (slots, kv_heads)."""
    if is_quantised(key.dtype) != (key_scale is not None) or (key_scale is None) != (value_scale is None):
        raise ValueError(f"a {key.dtype} KV pool needs key_scale and value_scale exactly when it is quantised "
                         "(int8, fp8)")
    for tensor in (key_scale, value_scale):
        if tensor is not None and (tensor.shape != key.shape[:2] or not tensor.is_contiguous()
                                   or tensor.dtype != torch.float32):
            raise ValueError(f"scales must be contiguous float32 {tuple(key.shape[:2])}, got {tuple(tensor.shape)}")
    return key_scale is not None


def paged_attention_decode_reference(q: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                                     block_tables: torch.Tensor, context_lens: torch.Tensor, block_size: int,
                                     scale: float, key_scale: torch.Tensor | None = None,
                                     value_scale: torch.Tensor | None = None) -> torch.Tensor:
    """The same computation in plain torch, one sequence at a time, in float32 (dequantised first)."""
    if key_scale is not None:
        key, value = dequantise(key, key_scale), dequantise(value, value_scale)  # (slots, kv_heads, head_dim)
    num_heads, num_kv_heads = q.shape[1], key.shape[1]
    outputs = []
    for seq in range(q.shape[0]):
        length = int(context_lens[seq])
        positions = torch.arange(length, device=q.device)
        slots = block_tables[seq].long()[positions // block_size] * block_size + positions % block_size
        k = key[slots].float().repeat_interleave(num_heads // num_kv_heads, dim=1)  # (context, heads, head_dim)
        v = value[slots].float().repeat_interleave(num_heads // num_kv_heads, dim=1)
        scores = torch.einsum("hd,chd->hc", q[seq].float(), k) * scale  # (heads, context)
        outputs.append(torch.einsum("hc,chd->hd", torch.softmax(scores, dim=-1), v))
    return torch.stack(outputs).to(q.dtype)
