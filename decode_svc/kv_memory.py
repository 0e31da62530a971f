"""KvMemory: the decode tier's KV blocks as its sequences use them, on top of the BlockManager (which knows
blocks, not sequences). Callers hold the engine's lock.

Lazy growth (--kv-growth lazy): a sequence holds blocks for the KV it has; before each step `grow` gives every
running sequence, oldest admitted first, the blocks that step writes (its next token and the most it may
speculate). When the pool runs out, the most recently admitted sequence is preempted (`preempt`): its full
blocks go to the prefix cache, all its blocks are freed, and it must compute its KV again. `readmit` gives a
preempted sequence blocks again: its leading full blocks from the prefix cache where they survived, fresh ones
for the rest, and only with a block to spare per running sequence (each may grow by one on the next step;
without the margin it would be preempted again at once).
"""

from common.kv.block_manager import BlockManager, OutOfBlocks
from decode_svc.draft import DraftProposer
from decode_svc.sequence import Sequence


class KvMemory:
    def __init__(self, blocks: BlockManager, *, lazy: bool, spare_tokens: int,
                 draft: DraftProposer | None = None) -> None:
        self.blocks = blocks
        self.lazy = lazy  # else upfront: each reservation holds prompt + max_new_tokens already
        self.spare_tokens = spare_tokens  # the most tokens a step may speculate per sequence
        self.draft = draft  # holds its own blocks per speculating sequence
        self.num_preemptions = 0

    def grow(self, running: list[Sequence]) -> list[Sequence]:
        """Blocks for this step's writes, to every running sequence that keeps running; returns those preempted
        for it (most recently admitted first), their blocks freed."""
        if not self.lazy:
            return []
        kept, preempted = sorted(running, key=lambda s: s.admit_order), []
        for seq in list(kept):
            if seq not in kept:
                continue  # preempted for an older sequence's growth
            budget = seq.transfer.num_prompt_tokens + seq.max_new_tokens
            needed = self.blocks.blocks_needed(min(seq.kv_target + 1 + self.spare_tokens, budget))
            while len(seq.block_ids) < needed:
                try:
                    seq.block_ids.extend(self.blocks.allocate_blocks(needed - len(seq.block_ids)))
                except OutOfBlocks:
                    victim = kept.pop()  # the most recently admitted
                    self.preempt(victim)
                    preempted.append(victim)
                    if victim is seq:
                        break
        return preempted

    def preempt(self, seq: Sequence) -> None:
        """Frees the sequence's blocks (its full ones stay cached); its KV is computed again when readmitted."""
        self.release(seq, keep_kv=True)
        if self.draft is not None:
            self.draft.release(seq)
        seq.pending_kv_from = 0
        seq.num_preemptions += 1
        self.num_preemptions += 1

    def readmit(self, seq: Sequence, num_running: int) -> bool:
        """Blocks for a preempted sequence about to run again; False (nothing taken) when the pool lacks room.
        A sequence whose blocks are held (its KV pushed, or a local prefill's reservation) needs none."""
        if seq.block_ids or seq.pending_kv_from is None:
            return True
        cached = self.blocks.match(seq.context[:seq.kv_target])
        needed = self.blocks.blocks_needed(seq.kv_target + 1) - len(cached)
        if self.blocks.num_free - needed < num_running:
            self.blocks.free(cached)
            return False
        seq.block_ids[:] = cached + self.blocks.allocate_blocks(needed)
        seq.pending_kv_from = len(cached) * self.blocks.block_size
        if seq.spec is not None and self.draft is not None:
            self.draft.attach(seq)
        return True

    def cache(self, seq: Sequence, length: int) -> None:
        """Puts the full blocks of the sequence's first `length` positions in the prefix cache: only when its
        reservation named the prompt's ids (what the KV pushed to it was computed from)."""
        if seq.transfer.prompt_ids:
            self.blocks.register(seq.block_ids, seq.context[:length])

    def release(self, seq: Sequence, *, keep_kv: bool) -> None:
        """Frees the sequence's blocks; with keep_kv, the full ones whose KV is whole stay in the prefix cache."""
        if keep_kv:
            self.cache(seq, seq.kv_len)
        self.blocks.free(seq.block_ids)
        seq.block_ids.clear()
