"""Protobuf <-> domain objects for the decode service. Nothing past this module sees protobuf."""

from dataclasses import dataclass

from common.basics.compat import Compat
from common.basics.errors import InvalidArgument
from common.basics.request_id import checked_request_id
from common.basics.sampling import SamplingConfig
from common.edge.proto import (
    FINISH_REASONS,
    compat_to_proto,
    logprob_to_proto,
    sampling_from_proto,
)
from decode_svc.engine import ReservedKv
from decode_svc.sequence import DecodeEvent, DecodeStatsSnapshot
from pdserve.v1 import common_pb2, decode_pb2


@dataclass(frozen=True)
class ReserveCall:
    num_prompt_tokens: int
    max_new_tokens: int
    lease_s: float | None  # None: the instance's default lease
    prompt_ids: list[int]  # [] when not sent; else the whole prompt (checked by the engine)


@dataclass(frozen=True)
class DecodeCall:
    handle: str
    request_id: str
    first_token: int
    max_new_tokens: int
    sampling: SamplingConfig
    stop_token_ids: frozenset[int]
    stop_strings: tuple[str, ...]
    prompt_ids: list[int]
    speculate: bool | None  # None: the instance's setting
    first_step: int  # index of first_token among the request's new tokens
    prefill_locally: bool


def reserve_from_proto(request: decode_pb2.ReserveRequest) -> ReserveCall:
    """Raises InvalidArgument saying what to change."""
    if request.num_prompt_tokens < 1:
        raise InvalidArgument("num_prompt_tokens must be >= 1")
    if request.max_new_tokens < 1:
        raise InvalidArgument("max_new_tokens must be >= 1")
    return ReserveCall(request.num_prompt_tokens, request.max_new_tokens,
                       request.lease_ms / 1000 if request.lease_ms else None, list(request.prompt_token_ids))


def reservation_to_proto(reserved: ReservedKv, compat: Compat) -> decode_pb2.ReserveResponse:
    return decode_pb2.ReserveResponse(handle=reserved.handle, num_blocks=reserved.num_blocks,
                                      lease_expires_unix_ms=int(reserved.expires_unix_s * 1000),
                                      compat=compat_to_proto(compat), num_cached_tokens=reserved.num_cached_tokens)


def decode_call_from_proto(request: decode_pb2.DecodeRequest) -> DecodeCall:
    """Raises InvalidArgument saying what to change."""
    try:
        sampling = sampling_from_proto(request.sampling)
    except ValueError as error:
        raise InvalidArgument(str(error)) from None
    return DecodeCall(request.handle, checked_request_id(request.request_id), request.first_token_id, request.max_new_tokens, sampling,
                      frozenset(request.stop_token_ids), tuple(request.stop), list(request.prompt_token_ids),
                      request.speculative if request.HasField("speculative") else None, request.first_step,
                      request.prefill_locally)


def event_to_proto(event: DecodeEvent) -> decode_pb2.DecodeResponse:
    reason = FINISH_REASONS[event.finish_reason] if event.finish_reason else common_pb2.FINISH_REASON_UNSPECIFIED
    reply = decode_pb2.DecodeResponse(token_ids=event.token_ids, finish_reason=reason, queue_ms=event.queue_ms,
                                      local_prefill_ms=event.local_prefill_ms,
                                      logprobs=[logprob_to_proto(r) for r in event.logprobs or ()])
    if event.spec is not None:
        s = event.spec
        reply.speculation.CopyFrom(decode_pb2.SpeculationStats(
            num_proposed=s.num_proposed, num_accepted=s.num_accepted, num_verify_steps=s.num_verify_steps,
            num_verify_tokens=s.num_verify_tokens))
    return reply


def stats_to_proto(stats: DecodeStatsSnapshot) -> decode_pb2.DecodeStats:
    fields = {name: value for name, value in vars(stats).items() if name != "expert_load"}
    expert_load = [decode_pb2.ExpertLoad(layer=layer, tokens_per_expert=counts)
                   for layer, counts in enumerate(stats.expert_load)]
    return decode_pb2.DecodeStats(**fields, expert_load=expert_load)
