"""Protobuf <-> domain objects for the prefill service. Nothing past this module (and the gRPC KV transport)
sees protobuf."""

from dataclasses import dataclass

from common.basics.errors import InvalidArgument
from common.basics.sampling import SamplingConfig
from common.edge.proto import logprob_to_proto, sampling_from_proto
from common.kv.transport import KvAck
from pdserve.v1 import prefill_pb2
from prefill_svc.engine import PrefillJob, PrefillStatsSnapshot


@dataclass(frozen=True)
class PrefillCall:
    """A checked Prefill request: the prompt, how to draw its first token, and where its KV goes."""

    request_id: str
    prompt_ids: list[int]
    sampling: SamplingConfig
    decode_address: str
    kv_handle: str
    first_step: int  # index of the drawn token among the request's new tokens
    kv_skip: int  # leading tokens the decode reservation holds already: KV pushed from here


def call_from_proto(request: prefill_pb2.PrefillRequest, vocab_size: int, request_id: str) -> PrefillCall:
    """Raises InvalidArgument saying what to change."""
    if not request.prompt_token_ids:
        raise InvalidArgument("prompt_token_ids is empty")
    bad = [t for t in request.prompt_token_ids if t >= vocab_size]
    if bad:
        raise InvalidArgument(f"token ids {bad[:5]} are outside the vocabulary [0, {vocab_size})")
    if not request.decode_address or not request.kv_handle:
        raise InvalidArgument("decode_address and kv_handle name where the KV goes; both are required")
    if request.kv_skip_tokens >= len(request.prompt_token_ids):
        raise InvalidArgument(f"kv_skip_tokens {request.kv_skip_tokens} must be below the prompt's "
                              f"{len(request.prompt_token_ids)} tokens (the last token's KV is always pushed)")
    try:
        sampling = sampling_from_proto(request.sampling)
    except ValueError as error:
        raise InvalidArgument(str(error)) from None
    return PrefillCall(request_id, list(request.prompt_token_ids), sampling, request.decode_address,
                       request.kv_handle, request.first_step, request.kv_skip_tokens)


def reply_to_proto(job: PrefillJob, ack: KvAck, transferred_at: float) -> prefill_pb2.PrefillResponse:
    return prefill_pb2.PrefillResponse(
        first_token_id=job.first_token,
        queue_ms=(job.started_at - job.enqueued_at) * 1000,
        compute_ms=(job.computed_at - job.started_at) * 1000,
        kv_transfer_ms=(transferred_at - job.computed_at) * 1000,
        kv_bytes=ack.num_bytes,
        kv_chunks=ack.num_chunks,
        num_chunks=job.num_chunks,
        num_cached_tokens=job.num_cached,
        first_token_logprob=logprob_to_proto(job.first_logprob) if job.first_logprob is not None else None,
    )


def stats_to_proto(stats: PrefillStatsSnapshot) -> prefill_pb2.PrefillStats:
    return prefill_pb2.PrefillStats(**vars(stats))
