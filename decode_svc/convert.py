"""Protobuf <-> domain objects for the decode service. Nothing past this module sees protobuf."""

from common.edge.proto import FINISH_REASONS
from decode_svc.sequence import DecodeEvent, DecodeStatsSnapshot
from pdserve.v1 import common_pb2, decode_pb2


def event_to_proto(event: DecodeEvent) -> decode_pb2.DecodeResponse:
    reason = FINISH_REASONS[event.finish_reason] if event.finish_reason else common_pb2.FINISH_REASON_UNSPECIFIED
    reply = decode_pb2.DecodeResponse(token_ids=event.token_ids, finish_reason=reason, queue_ms=event.queue_ms)
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
