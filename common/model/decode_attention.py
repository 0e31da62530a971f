"""Decode attention: the new tokens of a batch of sequences against each sequence's KV in the paged pool.

Three ways, chosen by the runner (common/model/runner.py) and built into the DecodeBatch it hands the model:
- per sequence (CPU's default): each sequence attends over exactly its own context, read in place when its
  blocks are consecutive in the pool (SeqContext);
- paged kernel (CUDA's default, for steps where every sequence brings one token): the Triton paged-attention
  kernel (common/kernels/paged_attention.py) reads each sequence's blocks straight out of the pool, quantised
  codes and scales included, with no gather (PagedContexts);
- by padded groups (CUDA's steps with speculated drafts, where the kernel's one query token per sequence does
  not fit): sequences of similar length gathered together, padded to the longest of them (DecodeGroup; the
  split is common/model/decode_groups.py's).
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch

from common.basics.model_config import ModelConfig
from common.kv.pool import KvPool


@dataclass(frozen=True)
class SeqContext:
    """One sequence of a decode batch attended on its own, over exactly its context: no padding, and no copy
    when its blocks in use are consecutive in the pool (the block manager hands out runs when it can). On CPU,
    against padded group gathers, steps are 1.16-1.18x faster at 8 sequences of 1,000 tokens, 1.11-1.12x at
    four of 100-1,000, and 0.96-0.98x at 16 of 128, where the per-sequence calls cost more than the small
    gathers they save (scripts/micro/compare_checkouts.py)."""

    first_row: int  # its new tokens are rows first_row .. first_row + num_tokens - 1 of the batch
    num_tokens: int
    context: int  # positions 0 .. context - 1: up to and including its last new token
    run_start: int | None  # its first block when its blocks in use are consecutive, else None
    block_table: torch.Tensor  # (blocks in use,) gathered when run_start is None
    mask: torch.Tensor | None  # (num_tokens, 1, context) causal among its new tokens; None for one token


@dataclass(frozen=True)
class DecodeBatch:
    """A few new tokens per sequence (one, or more when verifying speculated tokens).

    Token rows are flattened (num_tokens = sum over sequences); the grouped path pads them to
    (batch, max_new, ...) where row `query_rows[i]` = sequence * max_new + offset holds token i.
    """

    token_ids: torch.Tensor  # (num_tokens,)
    positions: torch.Tensor  # (num_tokens,)
    slots: torch.Tensor  # (num_tokens,) where each new token's KV goes
    query_rows: torch.Tensor  # (num_tokens,) row of each token in the padded (batch * max_new) layout
    max_new: int
    num_seqs: int
    groups: tuple["DecodeGroup", ...]  # every sequence in exactly one (none when seqs or paged is set)
    seqs: tuple[SeqContext, ...] | None = None  # set (on CPU): each sequence attends on its own instead
    paged: "PagedContexts | None" = None  # set (one token per sequence, on CUDA): the paged kernel attends


@dataclass(frozen=True)
class DecodeGroup:
    """Sequences whose KV is gathered and attended together, padded to the longest of them."""

    seqs: torch.Tensor | None  # (g,) indices into the batch's sequences; None: all of them, in order
    block_tables: torch.Tensor  # (g, max_blocks) each sequence's blocks, padded with block 0
    context_mask: torch.Tensor  # (g, max_new, 1, max_blocks * block_size) 0 where a query may look, else -inf


@dataclass(frozen=True)
class PagedContexts:
    """One new token per sequence, attended by the paged-attention kernel straight out of the pool."""

    block_tables: torch.Tensor  # (num_seqs, max_blocks) int32, each sequence's blocks in use, padded with block 0
    context_lens: torch.Tensor  # (num_seqs,) int32: positions 0 .. context_len - 1, its new token's included


class DecodeAttention:
    """q (tokens, heads, head_dim), rotated -> (tokens, heads * head_dim), for one layer of a decode batch."""

    def __init__(self, config: ModelConfig) -> None:
        self.config = config
        self.group = config.num_heads // config.num_kv_heads  # query heads per KV head
        self.scale = config.head_dim**-0.5

    def for_batch(self, batch: DecodeBatch, kv: KvPool) -> Callable[[int, torch.Tensor], torch.Tensor]:
        """attend(layer, q) for this batch; the groups' masks are shaped once per step."""
        if batch.seqs is not None:
            return lambda layer, q: self._each(layer, q, batch.seqs, kv)
        if batch.paged is not None:
            # Imported here: triton is loaded only where the kernel serves.
            from common.kernels.paged_attention import paged_attention_decode

            return lambda layer, q: self._paged(paged_attention_decode, layer, q, batch.paged, kv)
        masks = [self._row_mask(group.context_mask, batch.max_new) for group in batch.groups]
        return lambda layer, q: self._groups(layer, q, batch, masks, kv)

    def _each(self, layer: int, q: torch.Tensor, seqs: tuple[SeqContext, ...], kv: KvPool) -> torch.Tensor:
        """One sequence at a time, over its own context; the scale goes on q once for all of them."""
        c = self.config
        q = q * self.scale
        outs = []
        for seq in seqs:
            n = seq.num_tokens
            k, v = kv.read_context(layer, seq.run_start, seq.block_table, seq.context)  # (context, kv_heads, d)
            if k.dtype != q.dtype:  # a float16 / bfloat16 pool under float32 compute
                k, v = k.to(q.dtype), v.to(q.dtype)
            q_heads = q[seq.first_row:seq.first_row + n].view(n, c.num_kv_heads, self.group, c.head_dim)
            q_heads = q_heads.transpose(0, 1).reshape(c.num_kv_heads, n * self.group, c.head_dim)
            scores = torch.bmm(q_heads, k.permute(1, 2, 0))  # (kv_heads, n * group, context)
            if seq.mask is not None:  # drafts: mask (n, 1, context) over the scores as (kv_heads, n, group, context)
                scores = (scores.view(c.num_kv_heads, n, self.group, -1) + seq.mask).flatten(1, 2)
            out = torch.bmm(torch.softmax(scores, dim=-1), v.transpose(0, 1))  # (kv_heads, n * group, head_dim)
            outs.append(out.view(c.num_kv_heads, n, -1).transpose(0, 1).reshape(n, -1))
        return torch.cat(outs) if len(outs) > 1 else outs[0]

    def _paged(self, kernel: Callable, layer: int, q: torch.Tensor, paged: PagedContexts,
               kv: KvPool) -> torch.Tensor:
        """q (seqs, heads, head_dim), one token per sequence -> (seqs, heads * head_dim), the pool read in place."""
        scales = (kv.key_scale[layer], kv.value_scale[layer]) if kv.quantised else (None, None)  # (slots, kv_heads)
        out = kernel(q, kv.key[layer], kv.value[layer], paged.block_tables, paged.context_lens, kv.block_size,
                     self.scale, *scales)  # (seqs, heads, head_dim)
        return out.reshape(q.shape[0], -1)

    def _row_mask(self, mask: torch.Tensor, max_new: int) -> torch.Tensor:
        """A group's (g, max_new, 1, context) mask as one row per query row of a KV head's scores, (g, max_new
        * group, context); (g, 1, context), broadcast over the rows, when each sequence brings one token."""
        g, context = mask.shape[0], mask.shape[-1]
        if max_new == 1:
            return mask.view(g, 1, context)
        return mask.expand(g, max_new, self.group, context).reshape(g, max_new * self.group, context)

    def _groups(self, layer: int, q: torch.Tensor, batch: DecodeBatch, masks: list[torch.Tensor],
                kv: KvPool) -> torch.Tensor:
        c = self.config
        num_seqs, max_new = batch.num_seqs, batch.max_new
        aligned = q.shape[0] == num_seqs * max_new  # every sequence brings max_new tokens: rows already in place
        if not aligned:
            q = q.new_zeros(num_seqs * max_new, c.num_heads, c.head_dim).index_copy_(0, batch.query_rows, q)
        padded = q.view(num_seqs, max_new, c.num_kv_heads, self.group, c.head_dim)
        if len(batch.groups) == 1 and batch.groups[0].seqs is None:
            out = self._group(layer, padded, batch.groups[0], masks[0], kv)
        else:
            out = padded.new_empty(num_seqs, max_new, c.num_heads * c.head_dim)
            for group, mask in zip(batch.groups, masks):
                out.index_copy_(0, group.seqs,
                                self._group(layer, padded.index_select(0, group.seqs), group, mask, kv))
        out = out.view(num_seqs * max_new, -1)
        return out if aligned else out.index_select(0, batch.query_rows)

    def _group(self, layer: int, q: torch.Tensor, group: DecodeGroup, mask: torch.Tensor,
               kv: KvPool) -> torch.Tensor:
        """q: (g, max_new, kv_heads, group, head_dim), mask: _row_mask's -> (g, max_new, heads * head_dim).
        Scores are scale * q k^T + mask in one baddbmm per product."""
        c = self.config
        num_seqs, max_new = q.shape[0], q.shape[1]
        k, v = kv.read_blocks(layer, group.block_tables)  # (g, context, kv_heads, head_dim) each
        if k.dtype != q.dtype:
            k, v = k.to(q.dtype), v.to(q.dtype)
        context = k.shape[1]
        if num_seqs == 1:  # one sequence: one batched matmul over the KV heads, on strided views of its context
            q_heads = q.view(max_new, c.num_kv_heads, -1, c.head_dim).transpose(0, 1)  # (kv_heads, max_new, group, d)
            q_heads = q_heads.reshape(c.num_kv_heads, max_new * self.group, c.head_dim)  # a view when max_new is 1
            scores = torch.baddbmm(mask, q_heads, k.view(context, c.num_kv_heads, c.head_dim).permute(1, 2, 0),
                                   alpha=self.scale)  # (kv_heads, max_new * group, context)
            out = torch.bmm(torch.softmax(scores, dim=-1), v.view(context, c.num_kv_heads, c.head_dim).transpose(0, 1))
            return out.view(c.num_kv_heads, max_new, self.group, c.head_dim).transpose(0, 1).reshape(1, max_new, -1)
        # Several: one batched matmul per KV head on strided views: BLAS reads them in place, where a permute
        # to (g, kv_heads, ...) would copy the whole gathered context first (25x slower here).
        outs = []
        for head in range(c.num_kv_heads):
            q_head = q[:, :, head].reshape(num_seqs, max_new * self.group, c.head_dim)
            scores = torch.baddbmm(mask, q_head, k[:, :, head].transpose(1, 2), alpha=self.scale)  # (g, rows, context)
            out = torch.bmm(torch.softmax(scores, dim=-1), v[:, :, head])  # (g, max_new * group, head_dim)
            outs.append(out.view(num_seqs, max_new, self.group, c.head_dim))
        return torch.stack(outs, dim=2).reshape(num_seqs, max_new, -1)
