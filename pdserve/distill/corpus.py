"""The draft's training data: text the target writes itself, with the target's next-token distribution
at every token it wrote (kept as its top-k, which holds nearly all the mass).

The target runs through the serving code (ModelRunner over a paged KvPool), continuously batched: a
finished answer's slot goes to the next prompt at once. Some answers are drawn greedily, the rest sampled
at temperature 0.7-1.0, so the draft sees both the target's favourite continuations and its spread.
"""

import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from common.basics.sampling import SamplingConfig
from common.basics.tokenizer import TextTokenizer
from common.kv.block_manager import BlockManager
from common.kv.pool import KvPool
from common.model.runner import DecodeItem, ModelRunner, PrefillChunk
from common.model.sampling import sample
from common.model.weights import load_model
from pdserve.distill.prompts import PromptSource

_BLOCK_SIZE = 16
_MAX_PROMPT_TOKENS = 640
_GREEDY_SHARE = 0.25


@dataclass
class Sample:
    """One prompt and the target's answer; teacher row i is the target's distribution of answer token i."""

    token_ids: list[int]  # prompt then answer
    num_prompt_tokens: int
    teacher_ids: torch.Tensor  # (answer tokens, top_k) int64
    teacher_probs: torch.Tensor  # (answer tokens, top_k) float32

    @property
    def num_answer_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens


@dataclass
class _Writing:
    prompt_ids: list[int]
    block_ids: list[int]
    sampling: SamplingConfig
    answer: list[int] = field(default_factory=list)
    rows: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)  # (top_k,) ids, probs

    @property
    def position(self) -> int:
        """Position of the last answer token, the input of the next step."""
        return len(self.prompt_ids) + len(self.answer) - 1


class TargetWriter:
    """Answers prompts with the target, batched; records the target's top-k distribution per answer token."""

    def __init__(self, model_dir: Path, *, batch_size: int, max_new_tokens: int, top_k: int, seed: int) -> None:
        model = load_model(model_dir)
        c = model.config
        blocks_per_seq = -(-(_MAX_PROMPT_TOKENS + max_new_tokens) // _BLOCK_SIZE)
        num_blocks = batch_size * blocks_per_seq
        kv = KvPool(num_layers=c.num_layers, num_blocks=num_blocks, block_size=_BLOCK_SIZE,
                    num_kv_heads=c.num_kv_heads, head_dim=c.head_dim, dtype=torch.float32)
        self.runner = ModelRunner(model, kv)
        self.blocks = BlockManager(num_blocks, _BLOCK_SIZE)
        self.tokenizer = TextTokenizer(model_dir)
        self.eos_ids = frozenset(c.eos_token_ids)
        self.batch_size, self.max_new_tokens, self.top_k = batch_size, max_new_tokens, top_k
        self.rng = random.Random(seed)

    def write(self, prompts: PromptSource, deadline: float, on_sample: Callable[[Sample], None] | None = None,
              max_answers: int | None = None) -> list[Sample]:
        """Answers prompts until the monotonic `deadline` (or max_answers prompts); answers cut off at the
        deadline are kept as far as they got."""
        samples: list[Sample] = []
        writing: list[_Writing] = []
        num_started = 0
        while True:
            if time.monotonic() < deadline:
                room = self.batch_size - len(writing)
                if max_answers is not None:
                    room = min(room, max_answers - num_started)
                writing += self._start(prompts, room)
                num_started += room
            if not writing:
                return samples
            finished = self._step(writing) if time.monotonic() < deadline else list(writing)
            for seq in finished:
                writing.remove(seq)
                self.blocks.free(seq.block_ids)
                if len(seq.answer) >= 8:
                    samples.append(self._sample(seq))
                    prompts.add_text(self.tokenizer.decode(seq.answer))
                    if on_sample is not None:
                        on_sample(samples[-1])

    def _start(self, prompts: PromptSource, room: int) -> list[_Writing]:
        """Prefills up to `room` new prompts in one batch and draws each one's first answer token."""
        started = []
        while len(started) < room:
            ids = self.tokenizer.apply_chat_template([{"role": "user", "content": prompts.next()}])
            if len(ids) > _MAX_PROMPT_TOKENS:
                continue
            greedy = self.rng.random() < _GREEDY_SHARE
            sampling = SamplingConfig(temperature=0.0 if greedy else self.rng.uniform(0.7, 1.0),
                                      seed=self.rng.randrange(2**31))
            started.append(_Writing(ids, self.blocks.allocate(len(ids) + self.max_new_tokens), sampling))
        if started:
            logits = self.runner.run_prefill([PrefillChunk(s.prompt_ids, 0, s.block_ids) for s in started])
            self._record(started, logits)  # logits (len(started), vocab)
        return started

    def _step(self, writing: list[_Writing]) -> list[_Writing]:
        """One decode step for every sequence; returns those that finished."""
        logits = self.runner.run_decode([DecodeItem(s.answer[-1], s.position, s.block_ids) for s in writing])
        self._record(writing, logits)  # logits (len(writing), vocab)
        return [s for s in writing if s.answer[-1] in self.eos_ids or len(s.answer) >= self.max_new_tokens]

    def _record(self, seqs: list[_Writing], logits: torch.Tensor) -> None:
        probs, ids = torch.softmax(logits.float(), dim=-1).topk(self.top_k, dim=-1)  # (batch, top_k) each
        tokens = sample(logits, [s.sampling for s in seqs], [len(s.answer) for s in seqs])
        for row, (seq, token) in enumerate(zip(seqs, tokens)):
            seq.rows.append((ids[row].clone(), probs[row].clone()))
            seq.answer.append(token)

    @staticmethod
    def _sample(seq: _Writing) -> Sample:
        return Sample(seq.prompt_ids + seq.answer, len(seq.prompt_ids),
                      torch.stack([ids for ids, _ in seq.rows]), torch.stack([p for _, p in seq.rows]))
