"""Protobuf <-> domain objects shared by every tier: compatibility info, sampling, finish reasons, the prefix
cache's summary."""

from common.basics.compat import Compat
from common.basics.sampling import SamplingConfig, TokenLogprob
from common.kv.block_manager import PrefixSummary
from pdserve.v1 import common_pb2

FINISH_REASONS = {
    "stop": common_pb2.FINISH_REASON_STOP,
    "length": common_pb2.FINISH_REASON_LENGTH,
    "cancelled": common_pb2.FINISH_REASON_CANCELLED,
}


def compat_to_proto(compat: Compat) -> common_pb2.CompatInfo:
    return common_pb2.CompatInfo(
        model_id=compat.model_id,
        weights_digest=compat.weights_digest,
        kv_dtype=compat.kv_dtype,
        block_size=compat.block_size,
        num_layers=compat.num_layers,
        num_kv_heads=compat.num_kv_heads,
        head_dim=compat.head_dim,
        fingerprint=compat.fingerprint,
    )


def compat_from_proto(info: common_pb2.CompatInfo) -> Compat:
    return Compat(
        model_id=info.model_id,
        weights_digest=info.weights_digest,
        kv_dtype=info.kv_dtype,
        block_size=info.block_size,
        num_layers=info.num_layers,
        num_kv_heads=info.num_kv_heads,
        head_dim=info.head_dim,
    )


def sampling_from_proto(params: common_pb2.SamplingParams) -> SamplingConfig:
    """Raises ValueError on out-of-range values (callers map it to INVALID_ARGUMENT)."""
    return SamplingConfig(
        temperature=params.temperature if params.HasField("temperature") else 0.0,
        top_p=params.top_p if params.HasField("top_p") else 1.0,
        top_k=params.top_k if params.HasField("top_k") else 0,
        seed=params.seed if params.HasField("seed") else 0,
        repetition_penalty=params.repetition_penalty if params.HasField("repetition_penalty") else 1.0,
        presence_penalty=params.presence_penalty if params.HasField("presence_penalty") else 0.0,
        frequency_penalty=params.frequency_penalty if params.HasField("frequency_penalty") else 0.0,
        min_new_tokens=params.min_new_tokens if params.HasField("min_new_tokens") else 0,
        suppress_token_ids=frozenset(params.suppress_token_ids),
        logprobs=params.logprobs if params.HasField("logprobs") else None,
        grammar=params.grammar,
    )


def sampling_to_proto(config: SamplingConfig) -> common_pb2.SamplingParams:
    return common_pb2.SamplingParams(temperature=config.temperature, top_p=config.top_p, top_k=config.top_k,
                                     seed=config.seed, repetition_penalty=config.repetition_penalty,
                                     presence_penalty=config.presence_penalty,
                                     frequency_penalty=config.frequency_penalty, min_new_tokens=config.min_new_tokens,
                                     suppress_token_ids=sorted(config.suppress_token_ids), logprobs=config.logprobs,
                                     grammar=config.grammar)


def logprob_to_proto(record: TokenLogprob) -> common_pb2.TokenLogprob:
    return common_pb2.TokenLogprob(logprob=record.logprob, top=[common_pb2.TopLogprob(token_id=t, logprob=lp)
                                                                for t, lp in record.top])


def logprob_from_proto(reply: common_pb2.TokenLogprob) -> TokenLogprob:
    return TokenLogprob(reply.logprob, tuple((t.token_id, t.logprob) for t in reply.top))


def cache_summary_to_proto(summary: PrefixSummary, compat: Compat, weight_format: str) -> common_pb2.CacheSummary:
    """The summary an instance reports, with its KV layout (`compat`: common/kv) and weight format."""
    fingerprint, block_size = compat.fingerprint, compat.block_size
    return common_pb2.CacheSummary(
        weight_format=weight_format, kv_dtype=compat.kv_dtype,
        fingerprint=fingerprint, block_size=block_size, version=summary.version, unchanged=summary.hashes is None,
        block_hashes=summary.hashes or [], num_blocks_total=summary.num_blocks_total,
        num_blocks_free=summary.num_blocks_free, num_requests=summary.num_requests,
        num_queued_tokens=summary.num_queued_tokens, prefix_caching=summary.prefix_caching)
