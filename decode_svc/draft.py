"""Draft-model speculation: a small Llama-family model proposes k tokens per speculating sequence, batched,
with its own paged KV on the decode tier. One sequence's draft KV:

  attach()   -> slot     : blocks for prompt + max_new_tokens, held while the sequence decodes
  propose()  -> catch up : KV for every context token the draft lacks (the whole prompt at first: the
                           prompt KV from prefill is the target's), then k batched draft steps
  release()  -> freed    : finish, cancel or failure
The slot remembers which draft tokens it fed; at the next proposal the ones the target accepted keep
their KV and the rest are simply overwritten (blocks cover the whole budget, so nothing moves).
Its head may cover only some tokens (draft_head.json, from `pdserve distill-draft`): others get q = 0.
"""

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from common.basics.config import DecodeConfig
from common.basics.sampling import SamplingConfig
from common.kv.block_manager import BlockManager, OutOfBlocks
from common.kv.pool import KvPool
from common.model.draft_head import HEAD_FILE
from common.model.linear import DenseLinear
from common.model.runner import DecodeItem, ModelRunner, PrefillChunk
from common.model.sampling import probabilities
from common.model.weights import load_model
from decode_svc.draft_check import check_draft_matches
from decode_svc.sequence import Sequence
from decode_svc.speculation import Proposal

# Context tokens a draft step feeds at most per sequence; a longer backlog (the prompt, or text written
# while the sequence did not speculate) is prefilled first.
_MAX_STEP_TOKENS = 4
_SEED_MIX = 1_000_003


@dataclass
class _Slot:
    block_ids: list[int]
    num_cached: int = 0  # context positions [0, num_cached) hold this sequence's draft KV
    fed: list[int] = field(default_factory=list)  # draft tokens fed at positions num_cached, num_cached + 1, ...


class DraftProposer:
    def __init__(self, runner: ModelRunner, blocks: BlockManager, vocab_size: int,
                 head_ids: torch.Tensor | None = None) -> None:
        self.runner = runner
        self.blocks = blocks
        self.vocab_size = vocab_size
        self.head_ids = head_ids  # (head tokens,) the token of each draft logit; None: the whole vocabulary
        self._slots: dict[str, _Slot] = {}

    # Slots (RPC and loop threads, under the engine's lock).

    def attach(self, seq: Sequence) -> None:
        """Draft KV blocks for the sequence's whole budget; without them (pool full) it does not draft."""
        try:
            block_ids = self.blocks.allocate(seq.transfer.num_prompt_tokens + seq.max_new_tokens)
        except OutOfBlocks:
            return
        self._slots[seq.handle] = _Slot(block_ids)

    def release(self, seq: Sequence) -> None:
        slot = self._slots.pop(seq.handle, None)
        if slot is not None:
            self.blocks.free(slot.block_ids)

    # Proposing (the loop thread).

    def propose(self, seqs: list[Sequence], ks: list[int]) -> list[Proposal]:
        """Up to ks[i] draft tokens for seqs[i], k batched draft forwards in all."""
        active = [i for i, (s, k) in enumerate(zip(seqs, ks)) if k > 0 and self._ready(s)]
        drafted: dict[int, list[int]] = {i: [] for i in active}
        probs: dict[int, list[torch.Tensor | None]] = {i: [] for i in active}
        if not active:
            return [Proposal() for _ in seqs]
        for i in active:
            self._rewind(seqs[i], self._slots[seqs[i].handle])
        self._catch_up([seqs[i] for i in active])
        live, logits = active, self._first_step([seqs[i] for i in active])  # (len(active), head tokens)
        for step in range(max(ks[i] for i in active)):
            if step:
                logits = self.runner.run_decode([DecodeItem(drafted[i][-1], seqs[i].position + step,
                                                            self._slots[seqs[i].handle].block_ids) for i in live])
            tokens, rows = self._choose(logits, [seqs[i].sampling for i in live],
                                        [seqs[i].next_step + step for i in live])
            for i, token, row in zip(live, tokens, rows):
                drafted[i].append(token)
                probs[i].append(row)
            live = [i for i in live if len(drafted[i]) < ks[i]]
            if not live:
                break
        for i in active:
            self._slots[seqs[i].handle].fed = drafted[i][:-1]  # the last draft token was never fed
        return [Proposal(drafted[i], _stack(probs[i])) if i in drafted else Proposal() for i in range(len(seqs))]

    def _ready(self, seq: Sequence) -> bool:
        """The draft needs the prompt's token ids (the gateway sends them) and a slot."""
        return seq.handle in self._slots and len(seq.prompt_ids) == seq.transfer.num_prompt_tokens

    @staticmethod
    def _rewind(seq: Sequence, slot: _Slot) -> None:
        """Keeps the KV of the fed draft tokens the target accepted: those now in the context."""
        context = seq.context
        accepted = 0
        while accepted < len(slot.fed) and slot.num_cached + accepted < len(context) \
                and slot.fed[accepted] == context[slot.num_cached + accepted]:
            accepted += 1
        slot.num_cached = min(slot.num_cached + accepted, seq.position)  # the last token is always fed
        slot.fed = []

    def _catch_up(self, seqs: list[Sequence]) -> None:
        """Prefills the backlog of sequences that lack draft KV for more than a step's worth of context."""
        chunks = []
        for seq in seqs:
            slot = self._slots[seq.handle]
            if seq.position + 1 - slot.num_cached > _MAX_STEP_TOKENS:
                chunks.append(PrefillChunk(seq.context[slot.num_cached:seq.position], slot.num_cached, slot.block_ids))
                slot.num_cached = seq.position
        if chunks:
            self.runner.run_prefill(chunks)

    def _first_step(self, seqs: list[Sequence]) -> torch.Tensor:
        """Feeds each sequence's uncached context, its last token included; returns the logits after it."""
        items = []
        for seq in seqs:
            slot = self._slots[seq.handle]
            pending = seq.context[slot.num_cached:seq.position + 1]
            items.append(DecodeItem(pending[0], slot.num_cached, slot.block_ids, tuple(pending[1:])))
            slot.num_cached = seq.position + 1
        logits = self.runner.run_decode(items)  # (sum of item.num_tokens, head tokens)
        return logits[torch.tensor([item.num_tokens for item in items]).cumsum(0) - 1]

    def _choose(self, logits: torch.Tensor, configs: list[SamplingConfig],
                steps: list[int]) -> tuple[list[int], list[torch.Tensor | None]]:
        """logits (batch, head tokens) -> a draft token per row (argmax, or drawn from q when the request
        samples) and its q over the whole vocabulary (None when greedy)."""
        picks = logits.argmax(dim=-1).tolist()
        rows: list[torch.Tensor | None] = [None] * len(configs)
        for r, (config, step) in enumerate(zip(configs, steps)):
            if not config.greedy:
                q = probabilities(logits[r], config)  # (head tokens,) with the request's temperature, top-k, top-p
                picks[r] = int(torch.multinomial(q, 1, generator=_draft_generator(config, step)))
                rows[r] = self._widen(q)
        tokens = self.head_ids[picks].tolist() if self.head_ids is not None else picks
        return tokens, rows

    def _widen(self, q: torch.Tensor) -> torch.Tensor:
        """q over the head's tokens -> (vocab,), 0 for tokens the head does not cover."""
        if self.head_ids is None:
            return q
        return torch.zeros(self.vocab_size).index_copy_(0, self.head_ids, q)

    @contextmanager
    def calibration(self, context: int) -> Iterator[Callable[[int], None]]:
        """A function running k batch-1 draft steps after `context` tokens, on scratch blocks, for timing
        what proposing k tokens costs."""
        scratch = self.blocks.allocate(context + 16)

        def propose(k: int) -> None:
            for step in range(k):
                self.runner.run_decode([DecodeItem(0, context + step, scratch)])

        try:
            yield propose
        finally:
            self.blocks.free(scratch)

    @property
    def num_free_blocks(self) -> int:
        return self.blocks.num_free


def _stack(rows: list[torch.Tensor | None]) -> torch.Tensor | None:
    return None if not rows or rows[0] is None else torch.stack(rows)  # (tokens, vocab)


def _draft_generator(config: SamplingConfig, step: int) -> torch.Generator:
    """The draft's own random stream for token `step`, apart from the streams verification uses (those are
    seeded at or above seed * _SEED_MIX; this one just below), so q's draw is independent of the test."""
    return torch.Generator().manual_seed((config.seed * _SEED_MIX - 1 - step) % 2**63)


def draft_for(config: DecodeConfig, target: ModelRunner, target_blocks: BlockManager) -> DraftProposer | None:
    """The draft proposer of a decode tier run with --speculative draft; None otherwise."""
    return load_draft(config, target, target_blocks.num_blocks) if config.speculative == "draft" else None


def load_draft(config: DecodeConfig, target: ModelRunner, num_blocks: int) -> DraftProposer:
    """The draft of `config.draft_model`, checked against the target's tokenizer, with a KV pool of
    num_blocks blocks of the target's block size (the target's token capacity: no sequence lacks room)."""
    draft_dir = Path(config.draft_model)
    if not (draft_dir / "config.json").exists():
        raise FileNotFoundError(f"--draft-model {draft_dir}: no config.json there (train one with "
                                "`pdserve distill-draft`)")
    check_draft_matches(config.model_dir, draft_dir)
    model = load_model(draft_dir, "fp32", target.model.device)
    c = model.config
    head_path = draft_dir / HEAD_FILE
    head_ids = None
    if head_path.exists():
        head_ids = torch.tensor(json.loads(head_path.read_text())["token_ids"], dtype=torch.long)
        model.lm_head = DenseLinear(model.lm_head.weight[head_ids.to(model.device)].contiguous())
    kv = KvPool(num_layers=c.num_layers, num_blocks=num_blocks, block_size=config.block_size,
                num_kv_heads=c.num_kv_heads, head_dim=c.head_dim, dtype=torch.float32, device=model.device)
    return DraftProposer(ModelRunner(model, kv), BlockManager(num_blocks, config.block_size), c.vocab_size, head_ids)
