"""Prefill engine. One prompt's life on the prefill tier:

  submit()    -> queued   : waits for local KV blocks (the whole prompt) in arrival order; the prompt's
                            leading full blocks come from the prefix cache where it holds them (short of the
                            last token, whose logits give the first token), and their compute is skipped
  step()      -> computing: one chunk of at most chunk_size tokens per step (chunked prefill); the
                            prompts of a step share one forward pass under max_batch_tokens; every
                            layer's new K/V goes to the prompt's KvSender as soon as it is computed
  last chunk  -> sampled  : the first token is drawn, the sender closed, the local blocks freed (the full
                            ones stay in the prefix cache, evicted least recently used)
Only KV the decode reservation lacks is pushed: from position kv_skip on (the leading blocks decode holds in
its own prefix cache), cached rows read from the pool first, then the computed ones.
The RPC thread then waits for the decode tier's acknowledgement and replies. A cancelled prompt
leaves the queue (or the next step), aborts its sender and frees its blocks.
"""

import functools
import threading
import time
from collections import deque
from dataclasses import dataclass, field

from common.basics.errors import (
    RateLimited,
    ResourceExhausted,
    Unavailable,
)
from common.basics.grammar import ModelGrammars
from common.basics.sampling import SamplingConfig, TokenLogprob
from common.kv.block_manager import BlockManager, OutOfBlocks, PrefixSummary
from common.kv.quant import KvRows
from common.kv.transport import KvSender
from common.model.constraint import Constraint, request_constraint
from common.model.runner import ModelRunner, PrefillChunk
from common.model.sampling import sample, token_logprobs
from common.runtime.engine_loop import EngineLoop

_QUEUE_FULL_RETRY_S = 1.0  # a hint for a caller turned away by a full queue, not a promise


@dataclass
class PrefillJob:
    request_id: str
    token_ids: list[int]
    sampling: SamplingConfig
    sender: KvSender
    first_step: int = 0  # index of the token drawn among the request's new tokens (k when it resumes after k)
    kv_skip: int = 0  # leading tokens the decode reservation holds already: not pushed
    num_cached: int = 0  # leading tokens found in this tier's prefix cache: not computed
    block_table: list[int] | None = None
    num_computed: int = 0
    num_chunks: int = 0
    first_token: int | None = None
    first_logprob: TokenLogprob | None = None  # when the sampling asks for log-probabilities
    constraint: Constraint | None = None  # the request's grammar at the output so far (sampling.grammar)
    cancelled: bool = False
    failed: bool = False  # a step computing it raised; the tier's log has the details
    done: threading.Event = field(default_factory=threading.Event)
    enqueued_at: float = field(default_factory=time.monotonic)
    started_at: float | None = None
    computed_at: float | None = None


@dataclass
class PrefillStatsSnapshot:
    num_queued: int
    num_queued_tokens: int
    num_steps: int
    num_prompts: int
    max_batch_prompts: int
    num_blocks_free: int
    num_blocks_total: int
    num_cached_blocks: int = 0
    num_prefix_query_tokens: int = 0
    num_prefix_hit_tokens: int = 0


class PrefillEngine:
    def __init__(self, runner: ModelRunner, blocks: BlockManager, *, chunk_size: int, max_batch_tokens: int,
                 max_queued: int = 256, grammars: ModelGrammars | None = None) -> None:
        self.runner = runner
        self.grammars = grammars  # enforces requests' response formats on the first token; None: refused
        self.blocks = blocks
        self.chunk_size = chunk_size
        self.max_batch_tokens = max_batch_tokens
        self.max_queued = max_queued  # prompts waiting or computing; the queue is bounded
        self.queued: deque[PrefillJob] = deque()
        self.computing: list[PrefillJob] = []
        self._cond = threading.Condition()
        self._loop = EngineLoop("prefill-engine", self._cond, step=self.step, has_work=self._has_work,
                                on_error=self._fail_computing)
        self._counts = {"steps": 0, "prompts": 0, "max_batch": 0}
        self.draining = False  # set on SIGTERM: nothing new is admitted, what is queued finishes

    def submit(self, job: PrefillJob) -> PrefillJob:
        if self.draining:
            raise Unavailable("this prefill instance is shutting down; send the request to another")
        # compiled here, outside the lock, at the output the request already has (a resumed one's first_step)
        job.constraint = request_constraint(self.grammars, job.sampling.grammar, job.token_ids, job.first_step,
                                            "prefill")
        if self.blocks.blocks_needed(len(job.token_ids)) > self.blocks.num_blocks:
            raise ResourceExhausted(
                f"a prompt of {len(job.token_ids)} tokens does not fit this prefill instance's KV pool "
                f"({self.blocks.num_blocks * self.blocks.block_size} tokens); raise --kv-memory-mb"
            )
        with self._cond:
            held = len(self.queued) + len(self.computing)
            if held >= self.max_queued:
                raise RateLimited(f"this prefill instance's queue is full ({held} prompts); retry shortly or on "
                                  "another instance", retry_after_s=_QUEUE_FULL_RETRY_S)
            self.queued.append(job)
            self._cond.notify()
        return job

    def cancel(self, job: PrefillJob) -> None:
        with self._cond:
            if not job.done.is_set():
                job.cancelled = True
                self._cond.notify()

    def step(self) -> bool:
        with self._cond:
            self._drop_cancelled()
            self._admit()
            batch, chunks = self._plan()
        if not chunks:
            return False

        def push(index: int, layer: int, stored: KvRows) -> None:
            job, start = batch[index], chunks[index].start
            if start + stored.num_tokens <= job.kv_skip:
                return
            if start < job.kv_skip:  # decode holds the chunk's first tokens already
                stored, start = stored.rows(job.kv_skip - start, stored.num_tokens), job.kv_skip
            job.sender.send(layer, start, stored)

        now = time.monotonic()
        for job in batch:
            job.started_at = job.started_at or now
        logits = self.runner.run_prefill(chunks, push)
        with self._cond:
            self._counts["steps"] += 1
            self._counts["max_batch"] = max(self._counts["max_batch"], len(batch))
            finished = []
            for row, (job, chunk) in enumerate(zip(batch, chunks)):
                job.num_computed += len(chunk.token_ids)
                job.num_chunks += 1
                if job.num_computed == len(job.token_ids):
                    finished.append((row, job))
            if finished:
                masks = [j.constraint.allowed() if j.constraint else None for _, j in finished]
                firsts = sample(logits[[row for row, _ in finished]], [j.sampling for _, j in finished],
                                [j.first_step for _, j in finished], [j.token_ids for _, j in finished], masks)
                for (row, job), token in zip(finished, firsts):
                    job.first_token = token
                    if job.sampling.logprobs is not None:
                        job.first_logprob = token_logprobs(logits[row:row + 1], [token], job.sampling.logprobs)[0]
                    job.computed_at = time.monotonic()
                    job.sender.close()
                    self.blocks.register(job.block_table, job.token_ids)
                    self._retire(job)
        return True

    def _admit(self) -> None:
        while self.queued:
            job = self.queued[0]
            cached = self.blocks.match(job.token_ids, max_tokens=len(job.token_ids) - 1)
            try:
                fresh = self.blocks.allocate_blocks(self.blocks.blocks_needed(len(job.token_ids)) - len(cached))
            except OutOfBlocks:
                self.blocks.free(cached)
                return
            job.block_table = cached + fresh
            job.sender.source(job.block_table)
            job.num_cached = job.num_computed = len(cached) * self.blocks.block_size
            self._push_cached(job)
            self.computing.append(self.queued.popleft())

    def _push_cached(self, job: PrefillJob) -> None:
        """Sends the cached KV decode lacks (positions kv_skip up to the cached prefix's end), layer by layer."""
        if job.kv_skip >= job.num_cached:
            return
        for layer in range(self.runner.kv.num_layers):
            job.sender.send(layer, job.kv_skip, self.runner.read_kv(layer, job.block_table, job.kv_skip,
                                                                    job.num_cached))

    def _plan(self) -> tuple[list[PrefillJob], list[PrefillChunk]]:
        batch, chunks, budget = [], [], self.max_batch_tokens
        for job in self.computing:
            size = min(self.chunk_size, len(job.token_ids) - job.num_computed, budget)
            if size <= 0:
                break
            start = job.num_computed
            batch.append(job)
            chunks.append(PrefillChunk(job.token_ids[start:start + size], start, job.block_table))
            budget -= size
        return batch, chunks

    def _drop_cancelled(self) -> None:
        for job in [j for j in (*self.queued, *self.computing) if j.cancelled]:
            job.sender.abort()
            self._retire(job)
        self.queued = deque(j for j in self.queued if not j.cancelled)

    def _retire(self, job: PrefillJob) -> None:
        """Frees the job's local blocks (once its sender no longer reads them) and wakes its RPC thread. Caller
        holds the lock."""
        if job in self.computing:
            self.computing.remove(job)
            job.sender.release_source(functools.partial(self._free_blocks, job.block_table))
        if not job.cancelled:
            self._counts["prompts"] += 1
        job.done.set()

    def _free_blocks(self, block_table: list[int]) -> None:
        with self._cond:
            self.blocks.free(block_table)
            self._cond.notify()  # a queued prompt may fit now

    def start(self) -> None:
        self._loop.start()

    def stop(self) -> None:
        with self._cond:
            for job in (*self.queued, *self.computing):
                job.cancelled = True
            self._drop_cancelled()
        self._loop.stop()

    def _fail_computing(self) -> None:
        with self._cond:
            for job in self.computing:
                job.cancelled = job.failed = True
            self._drop_cancelled()

    def _has_work(self) -> bool:
        return bool(self.queued or self.computing)

    def busy(self) -> bool:
        """Whether any prompt is queued or computing (what a drain waits for)."""
        with self._cond:
            return self._has_work()

    def stats(self) -> PrefillStatsSnapshot:
        with self._cond:
            jobs = (*self.queued, *self.computing)
            return PrefillStatsSnapshot(
                num_queued=len(jobs),
                num_queued_tokens=sum(len(j.token_ids) - j.num_computed for j in jobs),
                num_steps=self._counts["steps"],
                num_prompts=self._counts["prompts"],
                max_batch_prompts=self._counts["max_batch"],
                num_blocks_free=self.blocks.num_free,
                num_blocks_total=self.blocks.num_blocks,
                num_cached_blocks=self.blocks.num_cached,
                num_prefix_query_tokens=self.blocks.prefix_counts.query_tokens,
                num_prefix_hit_tokens=self.blocks.prefix_counts.hit_tokens,
            )

    def cache_summary(self, known_version: int) -> PrefixSummary:
        with self._cond:
            jobs = (*self.queued, *self.computing)
            return self.blocks.summary(known_version, num_requests=len(jobs),
                                       num_queued_tokens=sum(len(j.token_ids) - j.num_computed for j in jobs))
