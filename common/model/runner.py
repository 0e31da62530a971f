"""ModelRunner: the only owner of tensors. Turns plain plans (token ids, positions, block tables) into
model inputs, runs them under inference mode, and hands back logits."""

from collections.abc import Callable
from dataclasses import dataclass

import torch

from common.kv_pool import KvPool
from common.model.llama import DecodeBatch, LlamaModel, PrefillSpan

# (chunk index in the batch, layer, key (tokens, kv_heads, head_dim), value (same))
ChunkKvHook = Callable[[int, int, torch.Tensor, torch.Tensor], None]


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
    def __init__(self, model: LlamaModel, kv: KvPool) -> None:
        self.model = model
        self.kv = kv

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

        def split_per_chunk(layer: int, key: torch.Tensor, value: torch.Tensor) -> None:
            for index, span in enumerate(spans):
                rows = slice(span.offset, span.offset + span.num_tokens)
                on_chunk_kv(index, layer, key[rows], value[rows])

        return self.model.prefill(
            torch.tensor(token_ids, device=self.kv.device), torch.cat(positions), torch.cat(slots), spans, self.kv,
            split_per_chunk if on_chunk_kv is not None else None,
        )

    @torch.inference_mode()
    def write_kv(self, layer: int, block_table: list[int], start: int, key: torch.Tensor,
                 value: torch.Tensor) -> None:
        """Stores received KV (tokens, kv_heads, head_dim) for positions [start, start + tokens)."""
        self.kv.write(layer, self.kv.slots(block_table, start, start + key.shape[0]), key, value)

    @torch.inference_mode()
    def run_decode(self, items: list[DecodeItem]) -> torch.Tensor:
        """Returns logits (sum of item.num_tokens, vocab): for each item's token and each draft token,
        in order, the distribution of the token after it."""
        block_size, device = self.kv.block_size, self.kv.device
        max_new = max(item.num_tokens for item in items)
        max_blocks = max(len(item.block_table) for item in items)
        tables = torch.tensor([item.block_table + [0] * (max_blocks - len(item.block_table)) for item in items],
                              device=device)  # (batch, max_blocks)
        token_ids, positions, rows, seq_of_token = [], [], [], []
        for index, item in enumerate(items):
            token_ids += [item.token_id, *item.draft_ids]
            positions += range(item.position, item.position + item.num_tokens)
            rows += range(index * max_new, index * max_new + item.num_tokens)
            seq_of_token += [index] * item.num_tokens
        positions_t = torch.tensor(positions, device=device)  # (num_tokens,)
        own_block = tables[torch.tensor(seq_of_token, device=device), positions_t // block_size]
        # Query t of a sequence sees positions <= its own; padding queries repeat the last real one.
        last = torch.tensor([[item.position + min(t, item.num_tokens - 1) for t in range(max_new)] for item in items],
                            device=device)  # (batch, max_new)
        offsets = torch.arange(max_blocks * block_size, device=device)  # (context,)
        valid = offsets[None, None, :] <= last[:, :, None]  # (batch, max_new, context)
        mask = torch.zeros(valid.shape, device=device).masked_fill_(~valid, float("-inf"))[:, :, None, :]
        batch = DecodeBatch(
            token_ids=torch.tensor(token_ids, device=device),
            positions=positions_t,
            slots=own_block * block_size + positions_t % block_size,
            query_rows=torch.tensor(rows, device=device),
            max_new=max_new,
            block_tables=tables,
            context_mask=mask,
        )
        return self.model.decode(batch, self.kv)
