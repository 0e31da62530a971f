"""The gateway's `Tiers` (gateway/tiers.py) over gRPC: a stub per prefill and decode instance, each call carrying
the request id and trace context in its metadata and the client's remaining deadline. Protobuf stays between
this module and gateway/convert.py."""

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from common.basics.errors import Cancelled
from common.basics.sampling import SamplingConfig
from common.edge.discovery import Instance
from common.edge.errors import upstream
from common.edge.server import Tls, make_channel
from common.edge.tracing import outgoing_metadata
from gateway import convert
from gateway.tiers import CacheSummary, CallContext, DecodeArgs
from pdserve.v1 import common_pb2, decode_pb2, decode_pb2_grpc, prefill_pb2_grpc

_RELEASE_TIMEOUT_S = 2.0
_HEALTH_TIMEOUT_S = 1.0


class _Pending:
    """A unary call in flight: result() converts its reply, or raises the tier's error as a typed one."""

    def __init__(self, future: grpc.Future, convert_reply, what: str) -> None:
        self._future, self._convert, self._what = future, convert_reply, what

    def result(self):
        try:
            return self._convert(self._future.result())
        except grpc.FutureCancelledError:
            raise Cancelled("the request was cancelled") from None
        except grpc.RpcError as error:
            raise upstream(error, self._what) from None

    def cancel(self) -> None:
        self._future.cancel()


class _DecodeStream:
    def __init__(self, call, what: str) -> None:
        self._call, self._what = call, what

    def __iter__(self):
        try:
            for reply in self._call:
                yield convert.decode_chunk(reply)
        except grpc.RpcError as error:
            raise upstream(error, self._what) from None

    def cancel(self) -> None:
        self._call.cancel()


class GrpcTiers:
    def __init__(self, prefill_addresses: tuple[str, ...], decode_addresses: tuple[str, ...],
                 tls: Tls | None = None) -> None:
        self._tls = tls
        self._prefill: dict[str, prefill_pb2_grpc.PrefillStub] = {}
        self._decode: dict[str, decode_pb2_grpc.DecodeStub] = {}
        self._health: dict[str, health_pb2_grpc.HealthStub] = {}
        for tier, addresses in (("prefill", prefill_addresses), ("decode", decode_addresses)):
            for address in addresses:
                self.add(tier, Instance(address))

    def add(self, tier: str, instance: Instance) -> None:
        """Stubs for an instance (kept when it goes: calls in flight to it finish on its channel)."""
        if instance.address in self._health:
            return
        channel = make_channel(instance.address, self._tls, instance.tls_name)
        if tier == "prefill":
            self._prefill[instance.address] = prefill_pb2_grpc.PrefillStub(channel)
        else:
            self._decode[instance.address] = decode_pb2_grpc.DecodeStub(channel)
        self._health[instance.address] = health_pb2_grpc.HealthStub(channel)

    def reserve(self, address: str, prompt_ids: list[int], max_new_tokens: int, lease_ms: int,
                ctx: CallContext) -> _Pending:
        request = convert.reserve_request(ctx.request_id, prompt_ids, max_new_tokens, lease_ms)
        future = self._decode[address].Reserve.future(request, **_call_options(ctx))
        return _Pending(future, convert.reservation, f"decode instance {address}")

    def prefill(self, address: str, prompt_ids: list[int], sampling: SamplingConfig, decode_address: str,
                handle: str, ctx: CallContext, first_step: int = 0, kv_skip_tokens: int = 0) -> _Pending:
        request = convert.prefill_request(ctx.request_id, prompt_ids, sampling, decode_address, handle, first_step,
                                          kv_skip_tokens)
        future = self._prefill[address].Prefill.future(request, **_call_options(ctx))
        return _Pending(future, convert.prefill_result, f"prefill instance {address}")

    def decode(self, address: str, args: DecodeArgs, ctx: CallContext) -> _DecodeStream:
        call = self._decode[address].Decode(convert.decode_request(ctx.request_id, args), **_call_options(ctx))
        return _DecodeStream(call, f"decode instance {address}")

    def release(self, address: str, handle: str, ctx: CallContext) -> None:
        try:
            self._decode[address].Release(decode_pb2.ReleaseRequest(handle=handle), timeout=_RELEASE_TIMEOUT_S,
                                          metadata=outgoing_metadata(ctx.request_id, ctx.span))
        except grpc.RpcError as error:
            # The lease frees the blocks if the decode instance cannot be reached now.
            ctx.span.set_attribute("error.type", error.code().name)

    def decode_slots(self, address: str) -> int | None:
        try:
            return self._decode[address].Stats(decode_pb2.StatsRequest(), timeout=_HEALTH_TIMEOUT_S).batch_capacity
        except grpc.RpcError:
            return None

    def cache_summary(self, address: str, known_version: int) -> CacheSummary | None:
        stub = self._prefill.get(address) or self._decode[address]
        try:
            reply = stub.GetCacheSummary(common_pb2.CacheSummaryRequest(known_version=known_version),
                                         timeout=_HEALTH_TIMEOUT_S)
        except grpc.RpcError:
            return None
        return convert.cache_summary(reply)

    def serving(self, address: str) -> bool | None:
        try:
            reply = self._health[address].Check(health_pb2.HealthCheckRequest(), timeout=_HEALTH_TIMEOUT_S)
        except grpc.RpcError as error:
            return None if error.code() == grpc.StatusCode.DEADLINE_EXCEEDED else False
        return reply.status == health_pb2.HealthCheckResponse.SERVING


def _call_options(ctx: CallContext) -> dict:
    return {"timeout": ctx.timeout_s, "metadata": outgoing_metadata(ctx.request_id, ctx.span)}

