"""The records of the decode tier: a reservation's KV arriving, a sequence being decoded, the events
streamed back, and the counters the Stats RPC reports."""

import queue
import time
from dataclasses import dataclass, field

from common.basics.sampling import SamplingConfig, TokenLogprob
from common.basics.stop_strings import StopWatcher
from common.model.constraint import Constraint
from decode_svc.speculation import SpecState


@dataclass
class Transfer:
    """A reservation's KV arriving: tokens received so far per layer (from num_cached_tokens on: the leading
    blocks the prefix cache held). block_ids grows as the sequence generates (lazy KV growth)."""

    handle: str
    num_prompt_tokens: int
    max_new_tokens: int
    block_ids: list[int]
    received: list[int]
    prompt_ids: list[int] = field(default_factory=list)  # when the reservation named them (prefix caching)
    num_cached_tokens: int = 0

    @property
    def complete(self) -> bool:
        return all(n == self.num_prompt_tokens for n in self.received)


@dataclass(frozen=True)
class DecodeEvent:
    token_ids: list[int]
    finish_reason: str | None = None  # set on the last event
    queue_ms: float = 0.0
    spec: SpecState | None = None  # on the last event of a sequence that speculated
    local_prefill_ms: float = 0.0  # on the first event of a sequence prefilled here
    logprobs: list[TokenLogprob] | None = None  # one per token, when the sampling asks for them


@dataclass
class Sequence:
    handle: str
    transfer: Transfer
    tokens: list[int]  # generated so far, the prefill tier's first token included
    max_new_tokens: int
    sampling: SamplingConfig
    stop_token_ids: frozenset[int]
    stop_watcher: StopWatcher | None = None  # set when the request has stop strings
    prompt_ids: list[int] = field(default_factory=list)  # for prompt-lookup speculation, when sent
    spec: SpecState | None = None  # set when the sequence may speculate
    outbox: "queue.Queue[DecodeEvent]" = field(default_factory=queue.Queue)
    cancelled: bool = False
    finished: bool = False
    arrived_at: float = field(default_factory=time.monotonic)
    admitted_at: float | None = None
    first_step: int = 0  # index of tokens[0] among the request's new tokens (k when it resumed after k)
    # KV to compute here before the next step, from this position up to kv_target: set for a prefill on the
    # decode tier (the prompt's uncached part; then the first token is drawn) and after a preemption (all of it)
    pending_kv_from: int | None = None
    admit_order: int = 0  # when it last entered the running batch (a preemption picks the largest)
    num_preemptions: int = 0
    constraint: Constraint | None = None  # the request's grammar, at the output so far (sampling.grammar)

    @property
    def kv_target(self) -> int:
        """Positions whose KV the next step reads: the prompt and every token but the last (the step's input)."""
        return self.transfer.num_prompt_tokens + max(len(self.tokens) - 1, 0)

    @property
    def kv_len(self) -> int:
        """Positions whose KV is in the sequence's blocks now."""
        return self.kv_target if self.pending_kv_from is None else self.pending_kv_from

    @property
    def block_ids(self) -> list[int]:
        return self.transfer.block_ids

    @property
    def position(self) -> int:
        """Position of the last token, the input of the next step."""
        return self.transfer.num_prompt_tokens + len(self.tokens) - 1

    @property
    def next_step(self) -> int:
        """Index of the next token among the request's new tokens: what seeds its draw."""
        return self.first_step + len(self.tokens)

    @property
    def context(self) -> list[int]:
        return self.prompt_ids + self.tokens


@dataclass
class DecodeStatsSnapshot:
    num_blocks_total: int
    num_blocks_free: int
    num_reserved: int
    num_running: int
    num_steps: int
    num_tokens_generated: int
    max_batch_size: int
    mean_batch_size: float
    num_leases_expired: int
    num_cancelled: int
    block_size: int
    num_spec_proposed: int
    num_spec_accepted: int
    batch_capacity: int = 0  # the configured batch size (max_batch_size above is the largest batch run)
    expert_load: list[list[int]] = field(default_factory=list)  # per MoE layer, tokens per expert; [] if dense
    num_preemptions: int = 0
    num_cached_blocks: int = 0
    num_prefix_query_tokens: int = 0
    num_prefix_hit_tokens: int = 0
    num_local_prefills: int = 0
    num_preempted_waiting: int = 0
    num_fenced_blocks: int = 0
