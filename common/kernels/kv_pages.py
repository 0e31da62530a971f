"""KV page gather/scatter for transfer: copy a sequence's scattered pool slots into one contiguous buffer
(prefill side, before sending) and write received pages into the receiver's slots (decode side).

Pool layout (common/kv/pool.py): (layers, slots, kv_heads, head_dim); pages: (layers, num_tokens, kv_heads,
head_dim). One program copies one token row of one layer; dtype conversion happens on the way (e.g. a
float32 sender into a float16 pool). Quantised codes (int8, fp8) only move unconverted: their scales
(common/kv/quant.py) travel beside them, and a cast of codes alone would lose the scale.
"""

import torch
import triton
import triton.language as tl

from common.kv.quant import is_quantised


@triton.jit
def _gather_kernel(pages_ptr, cache_ptr, slots_ptr, num_tokens, stride_cl, stride_cs, stride_pl, stride_pt,
                   ROW: tl.constexpr, ROW_P2: tl.constexpr):
    token = tl.program_id(0)
    layer = tl.program_id(1).to(tl.int64)
    slot = tl.load(slots_ptr + token).to(tl.int64)
    cols = tl.arange(0, ROW_P2)
    row = tl.load(cache_ptr + layer * stride_cl + slot * stride_cs + cols, mask=cols < ROW)
    tl.store(pages_ptr + layer * stride_pl + token * stride_pt + cols, row.to(pages_ptr.dtype.element_ty),
             mask=cols < ROW)


@triton.jit
def _scatter_kernel(cache_ptr, pages_ptr, slots_ptr, num_tokens, stride_cl, stride_cs, stride_pl, stride_pt,
                    ROW: tl.constexpr, ROW_P2: tl.constexpr):
    token = tl.program_id(0)
    layer = tl.program_id(1).to(tl.int64)
    slot = tl.load(slots_ptr + token).to(tl.int64)
    cols = tl.arange(0, ROW_P2)
    row = tl.load(pages_ptr + layer * stride_pl + token * stride_pt + cols, mask=cols < ROW)
    tl.store(cache_ptr + layer * stride_cl + slot * stride_cs + cols, row.to(cache_ptr.dtype.element_ty),
             mask=cols < ROW)


def _check(cache: torch.Tensor, other: torch.dtype) -> int:
    if cache.dtype != other and (is_quantised(cache.dtype) or is_quantised(other)):
        raise ValueError(f"quantised KV moves as codes plus scales, never converted ({cache.dtype} <-> {other}): "
                         "use the pool's own dtype and dequantise with common/kv/quant.py")
    if not cache[0, 0].is_contiguous():
        raise ValueError("each (kv_heads, head_dim) row of the cache must be contiguous")
    return cache.shape[2] * cache.shape[3]


def gather_kv_pages(cache: torch.Tensor, slots: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """cache (layers, slots, kv_heads, head_dim); slots (num_tokens,). Returns (layers, num_tokens, kv_heads,
    head_dim), contiguous, in `dtype` (default: the cache's)."""
    row = _check(cache, dtype or cache.dtype)
    layers, num_tokens = cache.shape[0], slots.shape[0]
    pages = torch.empty(layers, num_tokens, *cache.shape[2:], dtype=dtype or cache.dtype, device=cache.device)
    if num_tokens:
        _gather_kernel[(num_tokens, layers)](pages, cache, slots.contiguous(), num_tokens, cache.stride(0),
                                             cache.stride(1), pages.stride(0), pages.stride(1),
                                             ROW=row, ROW_P2=triton.next_power_of_2(row))
    return pages


def scatter_kv_pages(cache: torch.Tensor, slots: torch.Tensor, pages: torch.Tensor) -> None:
    """Writes pages (layers, num_tokens, kv_heads, head_dim) into cache[:, slots], converting to its dtype."""
    row = _check(cache, pages.dtype)
    if pages.shape != (cache.shape[0], slots.shape[0], *cache.shape[2:]):
        raise ValueError(f"pages {tuple(pages.shape)} do not fit cache {tuple(cache.shape)} at {slots.shape[0]} slots")
    pages = pages.contiguous()
    if slots.shape[0]:
        _scatter_kernel[(slots.shape[0], cache.shape[0])](cache, pages, slots.contiguous(), slots.shape[0],
                                                          cache.stride(0), cache.stride(1), pages.stride(0),
                                                          pages.stride(1), ROW=row, ROW_P2=triton.next_power_of_2(row))


def gather_kv_pages_reference(cache: torch.Tensor, slots: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    return cache[:, slots.long()].to(dtype or cache.dtype).contiguous()


def scatter_kv_pages_reference(cache: torch.Tensor, slots: torch.Tensor, pages: torch.Tensor) -> None:
    cache[:, slots.long()] = pages.to(cache.dtype)
