"""ModelRunner: the only owner of tensors. Turns plain plans (token ids, positions, block tables) into
model inputs, runs them under inference mode, and hands back logits. For a mixture-of-experts model it also
counts the tokens each layer routed to each expert in the runs it made (`expert_load_counts`).

Decode attention takes one of three paths (common/model/decode_attention.py), fixed per runner by `attention`:
- "per-sequence", the default on CPU: plain torch, each sequence over its own context;
- "paged-kernel", the default on CUDA: the Triton paged-attention kernel for steps where every sequence
  brings one token; steps with speculated drafts (several query tokens per sequence) take "groups";
- "groups": plain torch over padded groups of similar length (the default on other devices, and on CUDA when
  the kernel cannot take the shape: head_dim and block_size must be powers of two)."""

from collections.abc import Callable
from dataclasses import dataclass

import torch

from common.kv.pool import KvPool
from common.kv.quant import KvRows
from common.model.decode_attention import (
    DecodeBatch,
    DecodeGroup,
    PagedContexts,
    SeqContext,
)
from common.model.decode_groups import plan_groups
from common.model.llama import LlamaModel, PrefillSpan

# (chunk index in the batch, layer, the chunk's K and V of that layer as the pool stored them)
ChunkKvHook = Callable[[int, int, KvRows], None]
ATTENTION_PATHS = ("per-sequence", "groups", "paged-kernel")


@dataclass(frozen=True)
class PrefillChunk:
    """Tokens [start, start + len(token_ids)) of one sequence, whose blocks are block_table."""

    token_ids: list[int]
    start: int
    block_table: list[int]


@dataclass(frozen=True)
class DecodeItem:
    """One sequence's next step: token_id sits at position, followed by any speculated draft_ids at the
    positions after it; their KV goes into block_table."""

    token_id: int
    position: int
    block_table: list[int]
    draft_ids: tuple[int, ...] = ()

    @property
    def num_tokens(self) -> int:
        return 1 + len(self.draft_ids)


class ModelRunner:
    def __init__(self, model: LlamaModel, kv: KvPool, attention: str | None = None) -> None:
        self.model = model
        self.kv = kv
        c = model.config
        self.attention = attention or _default_attention(kv, c.head_dim)  # one of ATTENTION_PATHS
        if self.attention not in ATTENTION_PATHS:
            raise ValueError(f"attention {self.attention!r} is not one of {ATTENTION_PATHS}")
        if self.attention == "paged-kernel" and not _kernel_fits(kv, c.head_dim):
            raise ValueError(f"the paged-attention kernel needs head_dim ({c.head_dim}) and block_size "
                             f"({kv.block_size}) to be powers of two")
        # (layers, experts) tokens routed since start (or the last reset); None for a dense model.
        self.expert_load = (torch.zeros(c.num_layers, c.num_experts, dtype=torch.long, device=kv.device)
                            if c.is_moe else None)

    def expert_load_counts(self) -> list[list[int]]:
        """Tokens routed to each expert, per layer ([] for a dense model)."""
        return self.expert_load.tolist() if self.expert_load is not None else []

    def reset_expert_load(self) -> None:
        if self.expert_load is not None:
            self.expert_load.zero_()

    @torch.inference_mode()
    def run_prefill(self, chunks: list[PrefillChunk], on_chunk_kv: ChunkKvHook | None = None) -> torch.Tensor:
        """Returns logits (len(chunks), vocab) at each chunk's last token."""
        spans, slots, positions, token_ids, offset = [], [], [], [], 0
        for chunk in chunks:
            end = chunk.start + len(chunk.token_ids)
            context = self.kv.slots(chunk.block_table, 0, end)  # (end,)
            spans.append(PrefillSpan(offset=offset, num_tokens=len(chunk.token_ids), start=chunk.start,
                                     context_slots=context))
            slots.append(context[chunk.start:])
            positions.append(torch.arange(chunk.start, end, device=self.kv.device))
            token_ids.extend(chunk.token_ids)
            offset += len(chunk.token_ids)

        def split_per_chunk(layer: int, stored: KvRows) -> None:
            for index, span in enumerate(spans):
                on_chunk_kv(index, layer, stored.rows(span.offset, span.offset + span.num_tokens))

        return self.model.prefill(
            torch.tensor(token_ids, device=self.kv.device), torch.cat(positions), torch.cat(slots), spans, self.kv,
            split_per_chunk if on_chunk_kv is not None else None, self.expert_load,
        )

    @torch.inference_mode()
    def write_kv(self, layer: int, block_table: list[int], start: int, rows: KvRows) -> None:
        """Stores received KV rows, as they came, for positions [start, start + rows.num_tokens)."""
        self.kv.write_rows(layer, self.kv.slots(block_table, start, start + rows.num_tokens), rows)

    @torch.inference_mode()
    def read_kv(self, layer: int, block_table: list[int], start: int, end: int) -> KvRows:
        """The stored rows of positions [start, end), as the pool holds them (to push cached KV on)."""
        return self.kv.read_rows(layer, self.kv.slots(block_table, start, end))

    @torch.inference_mode()
    def run_decode(self, items: list[DecodeItem]) -> torch.Tensor:
        """Returns logits (sum of item.num_tokens, vocab): for each item's token and each draft token,
        in order, the distribution of the token after it."""
        return self.model.decode(self._decode_batch(items), self.kv, self.expert_load)

    def _decode_batch(self, items: list[DecodeItem]) -> DecodeBatch:
        """The step's token rows, where their KV goes, and the attention plan of this runner's path."""
        block_size, device = self.kv.block_size, self.kv.device
        max_new = max(item.num_tokens for item in items)
        token_ids, positions, rows, slots = [], [], [], []
        for index, item in enumerate(items):
            token_ids += [item.token_id, *item.draft_ids]
            item_positions = range(item.position, item.position + item.num_tokens)
            positions += item_positions
            rows += range(index * max_new, index * max_new + item.num_tokens)
            slots += [item.block_table[p // block_size] * block_size + p % block_size for p in item_positions]
        groups, seqs, paged = (), None, None
        if self.attention == "per-sequence":  # each sequence over its own context: see SeqContext
            seqs = self._seq_contexts(items)
        elif self.attention == "paged-kernel" and max_new == 1:  # the kernel takes one query token per sequence
            paged = self._paged_contexts(items)
        else:  # padded groups: fewer kernel launches than per sequence
            plan = plan_groups([_blocks_in_use(item, block_size) for item in items])
            groups = tuple(self._decode_group(items, members, max_new, whole=len(plan) == 1) for members in plan)
        return DecodeBatch(
            token_ids=torch.tensor(token_ids, device=device),
            positions=torch.tensor(positions, device=device),
            slots=torch.tensor(slots, device=device),
            query_rows=torch.tensor(rows, device=device),
            max_new=max_new,
            num_seqs=len(items),
            groups=groups,
            seqs=seqs,
            paged=paged,
        )

    def _seq_contexts(self, items: list[DecodeItem]) -> tuple[SeqContext, ...]:
        """Each item's rows, context, blocks in use (a run of consecutive blocks or not) and causal mask."""
        device, block_size = self.kv.device, self.kv.block_size
        contexts, row = [], 0
        for item in items:
            n, context = item.num_tokens, item.position + item.num_tokens
            used = item.block_table[:_blocks_in_use(item, block_size)]
            run_start = used[0] if used == list(range(used[0], used[0] + len(used))) else None
            mask = None
            if n > 1:  # new token t sees positions up to its own, position + t
                own = torch.arange(item.position, context, device=device)[:, None]  # (n, 1)
                seen = torch.arange(context, device=device)[None, :] <= own  # (n, context)
                mask = torch.zeros(n, context, device=device).masked_fill_(~seen, float("-inf"))[:, None, :]
            contexts.append(SeqContext(row, n, context, run_start, torch.tensor(used, device=device), mask))
            row += n
        return tuple(contexts)

    def _paged_contexts(self, items: list[DecodeItem]) -> PagedContexts:
        """Each item's blocks in use, padded with block 0, and its context, its one new token included."""
        used = [item.block_table[:_blocks_in_use(item, self.kv.block_size)] for item in items]
        max_blocks = max(len(table) for table in used)
        tables = [table + [0] * (max_blocks - len(table)) for table in used]
        return PagedContexts(
            block_tables=torch.tensor(tables, dtype=torch.int32, device=self.kv.device),  # (seqs, max_blocks)
            context_lens=torch.tensor([item.position + 1 for item in items], dtype=torch.int32, device=self.kv.device),
        )

    def _decode_group(self, items: list[DecodeItem], seqs: list[int], max_new: int, whole: bool) -> DecodeGroup:
        """The padded block tables and attention mask of items[seqs] (all items, in order, when whole)."""
        device, block_size = self.kv.device, self.kv.block_size
        members = items if whole else [items[i] for i in seqs]
        used = [item.block_table[:_blocks_in_use(item, block_size)] for item in members]
        max_blocks = max(len(table) for table in used)
        tables = torch.tensor([table + [0] * (max_blocks - len(table)) for table in used], device=device)  # (g, max_blocks)
        # Query t of a sequence sees positions <= its own; padding queries repeat the last real one.
        last = torch.tensor([[item.position + min(t, item.num_tokens - 1) for t in range(max_new)] for item in members],
                            device=device)  # (g, max_new)
        offsets = torch.arange(max_blocks * block_size, device=device)  # (context,)
        valid = offsets[None, None, :] <= last[:, :, None]  # (g, max_new, context)
        mask = torch.zeros(valid.shape, device=device).masked_fill_(~valid, float("-inf"))[:, :, None, :]
        return DecodeGroup(seqs=None if whole else torch.tensor(seqs, device=device), block_tables=tables,
                           context_mask=mask)


def _blocks_in_use(item: DecodeItem, block_size: int) -> int:
    """Blocks holding positions 0 .. the item's last new token: the rest of its table is reserved for later."""
    return (item.position + item.num_tokens - 1) // block_size + 1


def _kernel_fits(kv: KvPool, head_dim: int) -> bool:
    """Whether the paged-attention kernel takes this shape: it tiles head_dim and block_size as powers of two."""
    return not (head_dim & (head_dim - 1) or kv.block_size & (kv.block_size - 1))


def _default_attention(kv: KvPool, head_dim: int) -> str:
    if kv.device.type == "cpu":
        return "per-sequence"
    return "paged-kernel" if kv.device.type == "cuda" and _kernel_fits(kv, head_dim) else "groups"
