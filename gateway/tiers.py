"""What a request asks for (GenerationSpec) and what the gateway asks of the tiers to serve it, in its own
terms (no protobuf): the `Tiers` protocol a Generation drives, and the records that cross it. gateway/grpc_tiers.py implements it over gRPC; the gateway's unit tests
implement it over engines in the same process.

A call may be cancelled from another thread (the client went away): `reserve` and `prefill` return a Pending
whose result() blocks, `decode` a Stream of chunks; both have cancel(). A tier's refusal is raised as
errors.Upstream with the tier's status; a cancelled call as errors.Cancelled.
"""

from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Protocol, TypeVar

from opentelemetry.trace import Span

from common.basics.sampling import SamplingConfig, TokenLogprob

T = TypeVar("T", covariant=True)


@dataclass(frozen=True)
class GenerationSpec:
    request_id: str
    prompt_ids: list[int]
    max_new_tokens: int
    sampling: SamplingConfig
    stop: tuple[str, ...]
    speculative: bool | None = None  # None: the deployment's setting
    stop_token_ids: frozenset[int] = frozenset()  # besides the model's EOS tokens
    ignore_eos: bool = False  # the model's EOS tokens do not end the stream
    n: int = 1  # completions of the prompt; completion i samples with seed + i

    def for_completion(self, index: int) -> "GenerationSpec":
        """Completion `index` of the request: its own seed (seed + index), one completion."""
        return replace(self, n=1, sampling=replace(self.sampling, seed=(self.sampling.seed + index) % 2**63))

    def stopping_token_ids(self, eos_token_ids: frozenset[int]) -> frozenset[int]:
        """The token ids that end this request's stream."""
        return (frozenset() if self.ignore_eos else eos_token_ids) | self.stop_token_ids

    def with_stops(self, eos_token_ids: frozenset[int]) -> "GenerationSpec":
        """This spec with its stop tokens in the sampling config, held back until min_new_tokens were generated."""
        if not self.sampling.min_new_tokens:
            return self
        return replace(self, sampling=replace(self.sampling, suppress_token_ids=self.stopping_token_ids(eos_token_ids)))


@dataclass(frozen=True)
class CallContext:
    """Travels with every call: the request's id and the span it belongs to (both go in the metadata), and
    the seconds left before the client's deadline (None: no deadline)."""

    request_id: str
    span: Span
    timeout_s: float | None


@dataclass(frozen=True)
class Reservation:
    handle: str
    num_cached_tokens: int = 0  # leading prompt tokens the decode instance holds already: push KV from here


@dataclass(frozen=True)
class PrefillResult:
    first_token: int
    queue_ms: float  # in the prefill tier's queue
    compute_ms: float
    kv_transfer_ms: float  # from the end of compute until decode acknowledged every page
    kv_bytes: int
    num_chunks: int  # forward passes the prompt took
    num_cached_tokens: int = 0  # leading prompt tokens the prefill instance found in its prefix cache
    first_logprob: TokenLogprob | None = None  # when the sampling asks for log-probabilities


@dataclass(frozen=True)
class CacheSummary:
    """What an instance holds in its prefix cache (names of full blocks, common/kv/prefix.py) and its load."""

    fingerprint: str
    block_size: int
    version: int
    block_hashes: frozenset[int] | None  # None: unchanged since the version the caller named
    num_blocks_total: int
    num_blocks_free: int  # free or evictable
    num_requests: int  # decode: sequences running or waiting; prefill: prompts queued or computing
    num_queued_tokens: int  # prefill: prompt tokens still to compute; decode: blocks held by its requests
    prefix_caching: bool
    weight_format: str = ""  # the instance's --weights
    kv_dtype: str = ""


@dataclass(frozen=True)
class SpeculationCounts:
    num_proposed: int
    num_accepted: int
    num_verify_steps: int
    num_verify_tokens: int


@dataclass(frozen=True)
class DecodeChunk:
    token_ids: list[int]
    finish_reason: str | None = None  # "stop" | "length" | "cancelled" on the last chunk
    speculation: SpeculationCounts | None = None  # on the last chunk of a request that speculated
    local_prefill_ms: float = 0.0  # on the first chunk of a request the decode instance prefilled itself
    logprobs: list[TokenLogprob] | None = None  # one per token, when the sampling asks for them


@dataclass(frozen=True)
class DecodeArgs:
    handle: str
    first_token: int
    max_new_tokens: int
    sampling: SamplingConfig
    stop_token_ids: frozenset[int]
    stop: tuple[str, ...]
    prompt_ids: list[int]
    speculative: bool | None
    first_step: int = 0  # index of first_token among the request's new tokens (k when resuming after k)
    prefill_locally: bool = False  # the decode instance computes the prompt's KV and draws first_token itself


class Pending(Protocol[T]):
    def result(self) -> T: ...
    def cancel(self) -> None: ...


class Stream(Protocol):
    def __iter__(self) -> Iterator[DecodeChunk]: ...
    def cancel(self) -> None: ...


class Tiers(Protocol):
    def reserve(self, address: str, prompt_ids: list[int], max_new_tokens: int, lease_ms: int,
                ctx: CallContext) -> Pending[Reservation]:
        """A decode instance's reservation for the prompt's KV, and how much of it that instance holds already."""

    def prefill(self, address: str, prompt_ids: list[int], sampling: SamplingConfig, decode_address: str,
                handle: str, ctx: CallContext, first_step: int = 0, kv_skip_tokens: int = 0) -> Pending[PrefillResult]:
        """The prompt's KV from position kv_skip_tokens on pushed into the reservation, and its next token (the
        request's first_step-th)."""

    def decode(self, address: str, args: DecodeArgs, ctx: CallContext) -> Stream:
        """The rest of the tokens, streamed."""

    def release(self, address: str, handle: str, ctx: CallContext) -> None:
        """Gives back a reservation that never reached Decode (best effort: its lease frees it anyway)."""

    def serving(self, address: str) -> bool | None:
        """Whether the instance answers its health check with SERVING now: False when it answers otherwise or
        cannot be reached, None when it does not answer in time (frozen, or only slow)."""

    def decode_slots(self, address: str) -> int | None:
        """The decode instance's batch size (sequences it steps at once), or None when it does not answer."""

    def cache_summary(self, address: str, known_version: int) -> CacheSummary | None:
        """What a prefill or decode instance holds in its prefix cache and its load, or None when it does not
        answer (block_hashes is None when known_version is still current)."""
