"""Decode engine. One request's life on the decode tier:

  reserve()        -> reserved : blocks for the prompt held under a lease (the request must fit the model's
                                 context and, alone, the pool); its leading full blocks come from the prefix
                                 cache when it holds them (their KV is not pushed again)
  receive_kv()     -> receiving: KV chunks land in those blocks, each layer in token order; each renews the lease
  start_decode()   -> waiting  : a client listens; admitted once every layer has every prompt token (or, with
                                 prefill_locally, admitted at once: the first step computes the prompt's
                                 uncached KV here and draws the first token: conditional disaggregation)
  step()           -> running  : one token per step in the shared batch (continuous batching), or,
                                 speculating, the accepted part of k proposed tokens plus one (a draft
                                 model, when there is one, keeps its own KV for the sequence meanwhile)
                   -> finished : EOS, stop string, max_new_tokens or cancel; blocks freed (full ones stay in
                                 the prefix cache), outbox closed
A reservation nobody decodes is freed by release(), or by the lease running out (expire in step()); a call
naming a lease that ran out hears so (ABORTED), not that the reservation never existed.

KV written over NIXL (--kv-transport nixl; common/kv/nixl_stream.py): open_write() hands the writer the
reservation's blocks, check_written() checks its progress, commit_write() checks the rest and completes the transfer
(the sequence is then admitted as after a push), close_write() ends the writer's stream. A reservation that ends
while its writer may still write is fenced, not freed (decode_svc/kv_writes.py).

Lazy KV growth (--kv-growth lazy, the default): a sequence holds blocks for what it has, and each step first
gives every running sequence the blocks that step writes. When the pool runs out, the most recently admitted
sequence is preempted: its full blocks go to the prefix cache, all its blocks are freed, and it waits at the
head of the queue; admitted again, its KV (prompt and tokens so far) is recomputed here, from whatever the
prefix cache still holds, and it goes on where it stopped. No reservation is taken while a preempted sequence
waits. --kv-growth upfront reserves prompt + max_new_tokens at once instead (fewer sequences fit).
The engine loop thread runs step(); RPC threads call the rest. One condition variable guards state;
the model runs outside it.
"""

import itertools
import logging
import threading
import time
import uuid
from collections import OrderedDict, deque
from dataclasses import dataclass

from common.basics.errors import (
    Aborted,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unavailable,
)
from common.basics.grammar import ModelGrammars
from common.basics.sampling import SamplingConfig, TokenLogprob
from common.basics.stop_strings import StopWatcher
from common.basics.tokenizer import TextTokenizer
from common.kv.block_manager import BlockManager, OutOfBlocks, PrefixSummary
from common.kv.quant import KvRows
from common.model.constraint import request_constraint
from common.model.runner import DecodeItem, ModelRunner, PrefillChunk
from common.model.sampling import sample, token_logprobs
from common.runtime.engine_loop import EngineLoop
from decode_svc.calibration import measure_step_costs
from decode_svc.draft import DraftProposer
from decode_svc.kv_memory import KvMemory
from decode_svc.kv_writes import KvWrites
from decode_svc.scheduler import Scheduler, SeqView
from decode_svc.sequence import DecodeEvent, DecodeStatsSnapshot, Sequence, Transfer
from decode_svc.speculation import (
    PromptLookupProposer,
    Proposal,
    SpecState,
    SpeculationConfig,
    choose,
    chosen_logprobs,
)

FINISH_STOP, FINISH_LENGTH, FINISH_CANCELLED = "stop", "length", "cancelled"
FINISH_ERROR = "error"  # a step failed; the stream ends with INTERNAL
FINISH_SHUTDOWN = "shutdown"  # the instance stopped under it; the stream ends UNAVAILABLE (the gateway resumes it)
_EXPIRED_REMEMBERED = 4096  # recently expired handles, so a late call hears why its reservation is gone
RECOMPUTE_CHUNK_TOKENS = 512  # most tokens per sequence per forward when KV is computed on this tier
_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReservedKv:
    handle: str
    num_blocks: int
    expires_unix_s: float
    num_cached_tokens: int  # leading prompt tokens whose KV the prefix cache held: push from here


class DecodeEngine:
    def __init__(self, runner: ModelRunner, blocks: BlockManager, scheduler: Scheduler, lease_s: float,
                 tokenizer: TextTokenizer, speculation: SpeculationConfig = SpeculationConfig(),
                 draft: DraftProposer | None = None, max_lease_s: float | None = None,
                 kv_growth: str = "lazy", grammars: ModelGrammars | None = None,
                 step_prefill_tokens: int = 0, fence_s: float = 10.0) -> None:
        self.runner = runner
        self.step_prefill_tokens = step_prefill_tokens  # per step, for KV computed here; 0: all of it first
        self.grammars = grammars  # enforces requests' response formats; None: such requests are refused
        self.lazy = kv_growth == "lazy"  # else upfront: prompt + max_new_tokens reserved at once
        self.tokenizer = tokenizer
        self.speculation = speculation
        self.proposer = PromptLookupProposer()
        self.draft = draft  # with --speculative draft: proposes instead of prompt lookup, owns the draft KV
        self.step_costs: tuple[float, ...] = ()  # measured in start() when speculation is on
        self.blocks = blocks
        self.scheduler = scheduler
        self.lease_s = lease_s
        self.max_lease_s = max(max_lease_s or lease_s, lease_s)  # longest lease a caller may ask for
        self.transfers: dict[str, Transfer] = {}
        self._expired: OrderedDict[str, float] = OrderedDict()  # handle -> its lease, most recent last
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self._cond = threading.Condition()
        self._loop = EngineLoop("decode-engine", self._cond, step=self.step, has_work=self._has_work,
                                on_idle=self._expire_leases, on_error=self._fail_running)
        self._counts = {"steps": 0, "tokens": 0, "batch_sum": 0, "batch_max": 0, "expired": 0, "cancelled": 0,
                        "proposed": 0, "accepted": 0, "local_prefills": 0}
        self._handle_ids = itertools.count()
        self._admissions = itertools.count()
        spare = speculation.num_tokens if speculation.method != "none" else 0
        self.memory = KvMemory(blocks, lazy=self.lazy, spare_tokens=spare, draft=draft)
        self.writes = KvWrites(blocks, fence_s)  # NIXL writers and the blocks fenced for them
        self.draining = False  # set on SIGTERM: no new reservation; what is held finishes

    # Reservation and KV arrival (RPC threads).

    def reserve(self, num_prompt_tokens: int, max_new_tokens: int, lease_s: float | None = None,
                prompt_ids: list[int] | None = None) -> ReservedKv:
        """Blocks for the prompt (for prompt + max_new_tokens with --kv-growth upfront); with prompt_ids, its
        leading full blocks that the prefix cache holds, short of its last token (whose KV is always pushed or
        computed: it yields the first token). A lease longer than max_lease_s is cut to it."""
        if num_prompt_tokens < 1 or max_new_tokens < 1:
            raise InvalidArgument("a reservation needs at least one prompt token and one new token")
        context = self.runner.model.config.max_position_embeddings
        if num_prompt_tokens + max_new_tokens > context:
            raise InvalidArgument(f"{num_prompt_tokens} prompt tokens plus max_new_tokens {max_new_tokens} exceed "
                                  f"the model's context of {context} tokens")
        prompt_ids = list(prompt_ids or [])
        if prompt_ids and len(prompt_ids) != num_prompt_tokens:
            raise InvalidArgument(f"prompt_token_ids holds {len(prompt_ids)} ids, num_prompt_tokens says "
                                  f"{num_prompt_tokens}; send the whole prompt or none")
        vocab = self.runner.model.config.vocab_size
        if any(t >= vocab for t in prompt_ids):
            raise InvalidArgument(f"prompt_token_ids holds ids outside the vocabulary [0, {vocab})")
        if self.draining:
            raise Unavailable("this decode instance is shutting down; reserve on another")
        whole = self.blocks.blocks_needed(num_prompt_tokens + max_new_tokens)
        if whole > self.blocks.num_blocks:
            raise ResourceExhausted(f"{num_prompt_tokens} prompt tokens plus max_new_tokens {max_new_tokens} need "
                                    f"{whole} KV blocks; this decode instance's pool holds {self.blocks.num_blocks}")
        handle = f"kv-{next(self._handle_ids)}-{uuid.uuid4().hex[:12]}"
        lease = min(lease_s or self.lease_s, self.max_lease_s)
        num_tokens = num_prompt_tokens if self.lazy else num_prompt_tokens + max_new_tokens
        with self._cond:
            if any(s.pending_kv_from is not None and s.num_preemptions for s in self.waiting):
                raise ResourceExhausted("decode KV pool is full: preempted sequences are waiting for room; "
                                        "retry later")
            try:
                reservation = self.blocks.reserve(handle, num_tokens, lease_s=lease, now=time.monotonic(),
                                                  prompt_ids=prompt_ids, max_cached_tokens=num_prompt_tokens - 1)
            except OutOfBlocks as error:
                raise ResourceExhausted(f"decode KV pool is full: {error}; retry later") from None
            cached = reservation.num_cached_tokens
            self.transfers[handle] = Transfer(handle, num_prompt_tokens, max_new_tokens, reservation.block_ids,
                                              [cached] * self.runner.kv.num_layers, prompt_ids, cached)
            self._cond.notify()
        return ReservedKv(handle, len(reservation.block_ids), time.time() + lease, cached)

    def receive_kv(self, handle: str, layer: int, start: int, rows: KvRows) -> None:
        """Stores one chunk as it came: layer `layer`, positions [start, start + rows.num_tokens)."""
        with self._cond:
            transfer = self._transfer(handle)
            if not 0 <= layer < len(transfer.received):
                raise InvalidArgument(f"layer {layer} is out of range [0, {len(transfer.received)})")
            if start != transfer.received[layer]:
                raise InvalidArgument(f"layer {layer}: chunk starts at token {start}, expected {transfer.received[layer]}")
            end = start + rows.num_tokens
            if end > transfer.num_prompt_tokens:
                raise InvalidArgument(f"chunk ends at token {end}, past the {transfer.num_prompt_tokens} reserved")
            # Under the lock: a concurrent release must not hand these blocks to another sequence mid-write.
            self.runner.write_kv(layer, transfer.block_ids, start, rows)
            transfer.received[layer] = end
            self.blocks.renew(handle, time.monotonic())
            if transfer.complete:
                self.blocks.register(transfer.block_ids, transfer.prompt_ids)  # the prompt's full blocks
                self._cond.notify()

    def transfer_complete(self, handle: str) -> bool:
        with self._cond:
            return self._transfer(handle).complete

    def release(self, handle: str) -> bool:
        with self._cond:
            if self.transfers.pop(handle, None) is not None and self.writes.end(handle, "the reservation was released"):
                return True
            return self.blocks.release(handle)

    # KV written over NIXL (RPC threads: the WriteKv stream).

    def open_write(self, handle: str, writer: str, token_start: int) -> tuple[list[int], int]:
        """The reservation's blocks (in token order) and prompt length, for `writer` to write from token_start on."""
        with self._cond:
            transfer = self._transfer(handle)
            if self.writes.writing(handle):
                raise FailedPrecondition(f"the KV reservation {handle!r} is being written already")
            if transfer.received != [transfer.num_cached_tokens] * len(transfer.received):
                raise FailedPrecondition(f"KV was pushed to the reservation {handle!r} already")
            if token_start != transfer.num_cached_tokens:
                raise InvalidArgument(f"the write starts at token {token_start}; the reservation holds KV up to token "
                                      f"{transfer.num_cached_tokens} (its num_cached_tokens): write from there")
            self.writes.writers[handle] = writer
            self.blocks.renew(handle, time.monotonic())
            return list(transfer.block_ids), transfer.num_prompt_tokens

    def check_written(self, handle: str, layers: range, start: int, end: int) -> None:
        """Tokens [start, end) of `layers` are written: checked (finite values), outside the lock (the blocks are
        the writer's until it commits: never reused meanwhile), and the lease renewed."""
        with self._cond:
            transfer = self.transfers.get(handle)
            if transfer is None:
                return  # the reservation ended: its writer hears the revocation
            block_ids = list(transfer.block_ids)
            self.blocks.renew(handle, time.monotonic())
        for layer in layers:
            self._check_finite(handle, block_ids, layer, start, end)

    def write_revoked(self, handle: str) -> str | None:
        """Why the reservation being written ended, or None while it lives."""
        with self._cond:
            return self.writes.revoked(handle)

    def commit_write(self, handle: str, checked: list[int]) -> None:
        """Every WRITE is in this pool: each layer's KV from checked[layer] on (check_written covered the rest) is
        checked and the transfer complete."""
        with self._cond:
            transfer = self._transfer(handle)
            if handle not in self.writes.writers:
                raise FailedPrecondition(f"no KV write into {handle!r} is open")
            end = transfer.num_prompt_tokens
            for layer, start in enumerate(checked):
                self._check_finite(handle, transfer.block_ids, layer, max(transfer.num_cached_tokens, start), end)
            transfer.received = [end] * len(transfer.received)
            del self.writes.writers[handle]
            self.blocks.renew(handle, time.monotonic())
            self.blocks.register(transfer.block_ids, transfer.prompt_ids)
            self._cond.notify()

    def _check_finite(self, handle: str, block_ids: list[int], layer: int, start: int, end: int) -> None:
        if end > start and not self.runner.kv.rows_in_place(layer, block_ids, start, end).all_finite():
            raise InvalidArgument(f"the KV written into {handle!r} holds NaN or infinite values in layer {layer}, "
                                  f"tokens [{start}, {end})")

    def close_write(self, handle: str, confirmed: bool) -> None:
        """The writer's stream ended; confirmed: it committed or stopped, so none of its WRITEs is in flight."""
        with self._cond:
            self.writes.close(handle, confirmed)

    def _transfer(self, handle: str) -> Transfer:
        transfer = self.transfers.get(handle)
        if transfer is not None:
            return transfer
        if handle in self._expired:
            raise Aborted(f"the KV reservation {handle!r} expired: no KV arrived for {self._expired[handle]:g} s "
                          "(its lease), so its blocks were freed; send the request again")
        raise NotFound(f"no KV reservation {handle!r} on this decode instance (released or never made)")

    # Decoding (RPC threads start and cancel; the loop thread steps).

    def start_decode(self, handle: str, first_token: int, max_new_tokens: int, sampling: SamplingConfig,
                     stop_token_ids: frozenset[int], stop_strings: tuple[str, ...] = (),
                     prompt_ids: list[int] | None = None, speculate: bool | None = None,
                     first_step: int = 0, prefill_locally: bool = False) -> Sequence:
        """speculate: None follows the instance's --speculative setting; False turns it off for this
        request; True asks for it (only where the instance has a proposer). first_step: the index of
        first_token among the request's new tokens (non-zero when the request resumed here).
        prefill_locally: no KV was pushed; this tier computes the prompt's uncached part and draws the first
        token itself (first_token is ignored). Lazy growth and local prefill need the whole prompt's ids (a
        preempted sequence's KV is recomputed from them)."""
        # compiled outside the lock (a complex grammar takes a while), at the output the request already has
        first = [] if prefill_locally else [first_token]
        constraint = request_constraint(self.grammars, sampling.grammar, list(prompt_ids or []) + first,
                                        first_step + len(first), "decode") if sampling.grammar else None
        with self._cond:
            transfer = self._transfer(handle)
            if self.writes.writing(handle):
                raise FailedPrecondition(f"KV is still being written into {handle!r} over NIXL; decode it once the "
                                         "prefill tier has answered")
            if max_new_tokens > transfer.max_new_tokens:
                raise InvalidArgument(f"max_new_tokens {max_new_tokens} exceeds the {transfer.max_new_tokens} reserved")
            if transfer.prompt_ids and prompt_ids and list(prompt_ids) != transfer.prompt_ids:
                raise InvalidArgument("prompt_token_ids differ from the ids the reservation was made for")
            prompt_ids = list(prompt_ids or transfer.prompt_ids)
            if (self.lazy or prefill_locally) and len(prompt_ids) != transfer.num_prompt_tokens:
                raise InvalidArgument(f"prompt_token_ids must hold the whole prompt ({transfer.num_prompt_tokens} "
                                      f"tokens, got {len(prompt_ids)}): this instance recomputes KV from them")
            if prefill_locally and transfer.received != [transfer.num_cached_tokens] * len(transfer.received):
                raise FailedPrecondition("KV was pushed to this reservation already; decode it without "
                                         "prefill_locally")
            self.blocks.claim(handle)
            del self.transfers[handle]
            watcher = StopWatcher(self.tokenizer, stop_strings) if stop_strings else None
            spec_on = self.speculation.method != "none" and speculate is not False
            seq = Sequence(handle, transfer, [] if prefill_locally else [first_token], max_new_tokens, sampling,
                           stop_token_ids, watcher, prompt_ids,
                           SpecState(self.speculation.num_tokens, self.step_costs, self.speculation.adaptive)
                           if spec_on else None, first_step=first_step,
                           pending_kv_from=transfer.num_cached_tokens if prefill_locally else None,
                           constraint=constraint)
            if seq.spec is not None and self.draft is not None:
                self.draft.attach(seq)
            reason = None if prefill_locally else self._finish_reason(seq, first_token)
            if reason:
                self._finish(seq, reason, [])
            else:
                self.waiting.append(seq)
                self._cond.notify()
            return seq

    def cancel(self, seq: Sequence) -> None:
        with self._cond:
            if not seq.finished:
                seq.cancelled = True
                self._cond.notify()

    def step(self) -> bool:
        """Runs one decode step (after computing the KV of sequences that need it); returns False when there was
        nothing to run."""
        with self._cond:
            self._expire_leases()
            by_handle = {s.handle: s for s in (*self.waiting, *self.running)}
            plan = self.scheduler.plan(
                [SeqView(s.handle, s.transfer.complete or s.pending_kv_from is not None, s.cancelled)
                 for s in self.waiting],
                [SeqView(s.handle, True, s.cancelled) for s in self.running],
            )
            for handle in plan.drop:
                self._finish(by_handle[handle], FINISH_CANCELLED, [])
            admitted = [by_handle[h] for h in plan.admit if self.memory.readmit(by_handle[h], len(self.running))]
            now = time.monotonic()
            for seq in admitted:
                seq.admitted_at = seq.admitted_at or now
                seq.admit_order = next(self._admissions)
            taken = {s.handle for s in admitted} | set(plan.drop)
            self.waiting = deque(s for s in self.waiting if s.handle not in taken)
            self.running = [by_handle[h] for h in plan.run if h in taken or h not in plan.admit]
            for seq in self.memory.grow(self.running):
                self._requeue(seq)
            computing = [s for s in self.running if s.pending_kv_from is not None]
            batch = [s for s in self.running if s.pending_kv_from is None]
        if computing:
            self._compute_kv(computing)
        if not batch:
            return bool(computing)
        proposals = self._propose(batch)
        logits = self.runner.run_decode([DecodeItem(s.tokens[-1], s.position, s.block_ids, tuple(p.tokens))
                                         for s, p in zip(batch, proposals)])  # (sum of 1 + len(draft), vocab)
        new_tokens = choose(batch, proposals, logits)
        new_logprobs = chosen_logprobs(batch, proposals, logits, new_tokens)
        with self._cond:
            self._record_step(len(batch))
            for proposal, tokens in zip(proposals, new_tokens):
                if proposal.tokens:
                    self._counts["proposed"] += len(proposal.tokens)
                    self._counts["accepted"] += len(tokens) - 1
            for seq, tokens, logprobs in zip(batch, new_tokens, new_logprobs):
                if not seq.finished:  # a preemption or cancel cannot land mid-step: this is the lock's holder
                    self._counts["tokens"] += self._append(seq, tokens, logprobs)
            self.running = [s for s in self.running if not s.finished]
        return True

    # KV computed on this tier (a local prefill, or a preempted sequence's recompute).

    def _compute_kv(self, seqs: list[Sequence]) -> None:
        """Computes each sequence's missing KV here (the loop thread, outside the lock), a chunk at a time; a
        sequence prefilled locally then draws its first token. With step_prefill_tokens, one forward of at most
        that many tokens (oldest admitted first) and back to the decode step: the rest waits for later steps."""
        started = time.monotonic()
        remaining = sorted(seqs, key=lambda s: s.admit_order)
        budget = self.step_prefill_tokens
        while remaining := [s for s in remaining if not s.finished and s.pending_kv_from is not None]:
            chunks, ran = [], []
            left = budget or len(remaining) * RECOMPUTE_CHUNK_TOKENS
            for seq in remaining:
                end = min(seq.pending_kv_from + RECOMPUTE_CHUNK_TOKENS, seq.kv_target, seq.pending_kv_from + left)
                if end > seq.pending_kv_from:
                    chunks.append(PrefillChunk(seq.context[seq.pending_kv_from:end], seq.pending_kv_from,
                                               seq.block_ids))
                    ran.append(seq)
                    left -= end - seq.pending_kv_from
            remaining = ran
            logits = self.runner.run_prefill(chunks)
            with self._cond:
                for seq, chunk in zip(remaining, chunks):
                    seq.pending_kv_from += len(chunk.token_ids)
                done = [i for i, s in enumerate(remaining) if s.pending_kv_from == s.kv_target]
                self._kv_computed([remaining[i] for i in done], logits[done], started)
            if budget:
                return

    def _kv_computed(self, seqs: list[Sequence], logits, started: float) -> None:
        """The sequences' KV is whole again: their full blocks are cached; those prefilled here draw their first
        token from the logits of their prompt's last position."""
        local = [i for i, s in enumerate(seqs) if not s.tokens]
        masks = [seqs[i].constraint.allowed() if seqs[i].constraint else None for i in local]
        firsts = sample(logits[local], [seqs[i].sampling for i in local], [seqs[i].next_step for i in local],
                        [seqs[i].context for i in local], masks) if local else []
        for i, token in zip(local, firsts):
            if seqs[i].constraint is not None:
                seqs[i].constraint.advance([token])
        for seq in seqs:
            seq.pending_kv_from = None
            self.memory.cache(seq, seq.kv_target)
        for i, token in zip(local, firsts):
            seq = seqs[i]
            self._counts["local_prefills"] += 1
            seq.tokens.append(token)
            top_n = seq.sampling.logprobs
            logprobs = token_logprobs(logits[i:i + 1], [token], top_n) if top_n is not None else None
            reason = self._finish_reason(seq, token)
            if reason:
                self._finish(seq, reason, [token], logprobs)
            else:
                seq.outbox.put(DecodeEvent([token], local_prefill_ms=(time.monotonic() - started) * 1000,
                                           logprobs=logprobs))
        self.running = [s for s in self.running if not s.finished]

    def _requeue(self, seq: Sequence) -> None:
        """A preempted sequence waits again: the preempted, oldest admitted first, ahead of every sequence never
        admitted."""
        self.running.remove(seq)
        preempted = sorted([s for s in self.waiting if s.num_preemptions and s.pending_kv_from is not None]
                           + [seq], key=lambda s: s.admit_order)
        self.waiting = deque(preempted + [s for s in self.waiting if s not in preempted])

    def _propose(self, batch: list[Sequence]) -> list[Proposal]:
        """Draft tokens per sequence (none for those not speculating this step)."""
        if len(batch) > self.speculation.max_batch_size:
            return [Proposal() for _ in batch]  # compute-bound now: verifying k tokens costs k times as much
        # Never propose past max_new_tokens: the verify step adds up to k + 1 tokens.
        ks = [min(s.spec.next_k(), s.max_new_tokens - len(s.tokens) - 1) if s.spec else 0 for s in batch]
        if self.draft is not None:
            return self.draft.propose(batch, ks)  # k batched draft forwards
        return [Proposal(self.proposer.propose(s.context, k) if k > 0 else []) for s, k in zip(batch, ks)]

    def _append(self, seq: Sequence, tokens: list[int], logprobs: list[TokenLogprob] | None = None) -> int:
        """Adds a step's tokens (and their log-probabilities, when asked for) in order, up to the first that ends
        the sequence; returns how many. Caller holds the lock."""
        for count, token in enumerate(tokens, start=1):
            seq.tokens.append(token)
            reason = self._finish_reason(seq, token)
            if reason:
                self._finish(seq, reason, tokens[:count], logprobs[:count] if logprobs is not None else None)
                return count
        seq.outbox.put(DecodeEvent(tokens, logprobs=logprobs))
        return len(tokens)

    def _finish_reason(self, seq: Sequence, token: int) -> str | None:
        if token in seq.stop_token_ids:
            return FINISH_STOP
        if seq.stop_watcher is not None and seq.stop_watcher.push([token]):
            return FINISH_STOP
        if len(seq.tokens) >= seq.max_new_tokens:
            return FINISH_LENGTH
        return None

    def _finish(self, seq: Sequence, reason: str, token_ids: list[int],
                logprobs: list[TokenLogprob] | None = None) -> None:
        """Frees the sequence's blocks (its full ones stay in the prefix cache) and closes its outbox. Caller holds
        the lock."""
        if seq.finished:
            return
        seq.finished = True
        self.memory.release(seq, keep_kv=reason != FINISH_ERROR)  # a failed step may have left its KV half written
        if self.draft is not None:
            self.draft.release(seq)
        if reason == FINISH_CANCELLED:
            self._counts["cancelled"] += 1
        start = seq.admitted_at if seq.admitted_at is not None else time.monotonic()
        seq.outbox.put(DecodeEvent(token_ids, reason, (start - seq.arrived_at) * 1000, seq.spec, logprobs=logprobs))

    def _expire_leases(self) -> None:
        self.writes.sweep()
        for reservation in self.blocks.expired(time.monotonic()):
            if not self.writes.end(reservation.handle, f"its lease ended ({reservation.lease_s:g} s without KV "
                                                       "progress)"):
                self.blocks.release(reservation.handle)
            self.transfers.pop(reservation.handle, None)
            self._counts["expired"] += 1
            self._expired[reservation.handle] = reservation.lease_s
            while len(self._expired) > _EXPIRED_REMEMBERED:
                self._expired.popitem(last=False)

    def _record_step(self, batch_size: int) -> None:
        c = self._counts
        c["steps"] += 1
        c["batch_sum"] += batch_size
        c["batch_max"] = max(c["batch_max"], batch_size)

    # The loop thread.

    def start(self) -> None:
        if self.speculation.method != "none":
            self.step_costs = measure_step_costs(self.runner, self.blocks, self.speculation.num_tokens, self.draft)
            _log.info("decode step cost verifying k = 0..%d drafts (proposing included): %s plain steps",
                      len(self.step_costs) - 1,
                      ", ".join(f"{c:.2f}" for c in self.step_costs))
            self.runner.reset_expert_load()  # the timing steps routed no request's tokens
        self._loop.start()

    def stop(self) -> None:
        with self._cond:
            for seq in (*self.waiting, *self.running):
                self._finish(seq, FINISH_SHUTDOWN, [])
        self._loop.stop()

    def _fail_running(self) -> None:
        with self._cond:
            for seq in self.running:
                self._finish(seq, FINISH_ERROR, [])
            self.running = []

    def busy(self) -> bool:
        """Whether any reservation or sequence is held (what a drain waits for)."""
        with self._cond:
            return bool(self.transfers or self.waiting or self.running or self.writes.fences)

    def _has_work(self) -> bool:
        return bool(self.running) or any(s.transfer.complete or s.cancelled or s.pending_kv_from is not None
                                         for s in self.waiting)

    def stats(self) -> DecodeStatsSnapshot:
        with self._cond:
            c = self._counts
            return DecodeStatsSnapshot(
                num_blocks_total=self.blocks.num_blocks,
                num_blocks_free=self.blocks.num_free,
                num_reserved=self.blocks.num_reserved,
                num_running=len(self.running),
                num_steps=c["steps"],
                num_tokens_generated=c["tokens"],
                max_batch_size=c["batch_max"],
                mean_batch_size=c["batch_sum"] / c["steps"] if c["steps"] else 0.0,
                num_leases_expired=c["expired"],
                num_cancelled=c["cancelled"],
                block_size=self.blocks.block_size,
                num_spec_proposed=c["proposed"],
                num_spec_accepted=c["accepted"],
                batch_capacity=self.scheduler.max_batch_size,
                expert_load=self.runner.expert_load_counts(),
                num_preemptions=self.memory.num_preemptions,
                num_cached_blocks=self.blocks.num_cached,
                num_prefix_query_tokens=self.blocks.prefix_counts.query_tokens,
                num_prefix_hit_tokens=self.blocks.prefix_counts.hit_tokens,
                num_local_prefills=c["local_prefills"],
                num_preempted_waiting=sum(1 for s in self.waiting if s.num_preemptions),
                num_fenced_blocks=self.writes.num_fenced_blocks,
            )

    def cache_summary(self, known_version: int) -> PrefixSummary:
        with self._cond:
            return self.blocks.summary(known_version, num_requests=len(self.waiting) + len(self.running),
                                       num_queued_tokens=self.blocks.num_blocks - self.blocks.num_free)
