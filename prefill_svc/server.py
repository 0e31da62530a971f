"""The prefill service edge: validates, checks the decode instance's KV layout, runs the engine."""

import threading
import time
from dataclasses import dataclass

import grpc
from opentelemetry import trace
from opentelemetry.trace import SpanKind
from prometheus_client import CollectorRegistry

from common.basics.compat import Compat
from common.basics.config import PrefillConfig
from common.basics.errors import (
    Cancelled,
    FailedPrecondition,
    Internal,
    PdserveError,
    Unavailable,
)
from common.edge.errors import maps_errors, status_of
from common.edge.metrics import PREFILL_STATS, PrefillMetrics, StatsCollector
from common.edge.proto import compat_from_proto, compat_to_proto
from common.edge.server import (
    REQUEST_ID_KEY,
    add_health,
    bind,
    make_channel,
    make_server,
    metadata_value,
    set_serving,
    time_remaining_s,
)
from common.edge.tracing import incoming_context, tracer
from common.kv.grpc_transport import GrpcKvSender
from common.runtime.tier import TierRuntime, build_runtime
from pdserve.v1 import decode_pb2, decode_pb2_grpc, prefill_pb2, prefill_pb2_grpc
from prefill_svc.convert import (
    PrefillCall,
    call_from_proto,
    reply_to_proto,
    stats_to_proto,
)
from prefill_svc.engine import PrefillEngine, PrefillJob
from prefill_svc.observe import record_prefill

SERVICE_NAME = "pdserve.v1.Prefill"
_POLL_S = 0.25
_INFO_TIMEOUT_S = 5.0


class DecodePeers:
    """Channels to decode instances, each checked once for a compatible KV layout."""

    def __init__(self, compat: Compat) -> None:
        self.compat = compat
        self._stubs: dict[str, decode_pb2_grpc.DecodeStub] = {}
        self._lock = threading.Lock()

    def stub_for(self, address: str) -> decode_pb2_grpc.DecodeStub:
        with self._lock:
            stub = self._stubs.get(address)
        if stub is not None:
            return stub
        stub = decode_pb2_grpc.DecodeStub(make_channel(address))
        try:
            theirs = compat_from_proto(stub.GetInfo(decode_pb2.GetInfoRequest(), timeout=_INFO_TIMEOUT_S))
        except grpc.RpcError as error:
            raise Unavailable(f"decode instance {address} did not answer GetInfo: {error.details()}") from None
        if theirs != self.compat:
            raise FailedPrecondition(
                f"decode instance {address} has an incompatible KV layout ({'; '.join(self.compat.differences(theirs))}); "
                "run prefill and decode with the same model, --kv-dtype and --block-size"
            )
        with self._lock:
            self._stubs[address] = stub
        return stub


class PrefillServicer(prefill_pb2_grpc.PrefillServicer):
    def __init__(self, engine: PrefillEngine, compat: Compat, vocab_size: int, metrics: PrefillMetrics) -> None:
        self.engine = engine
        self.metrics = metrics
        self.compat = compat
        self.vocab_size = vocab_size
        self.peers = DecodePeers(compat)
        self._tracer = tracer("pdserve.prefill")

    @maps_errors
    def GetInfo(self, request, context):
        return compat_to_proto(self.compat)

    @maps_errors
    def Stats(self, request, context):
        return stats_to_proto(self.engine.stats())

    @maps_errors
    def Prefill(self, request, context):
        request_id = request.request_id or metadata_value(context, REQUEST_ID_KEY) or ""
        with self._tracer.start_as_current_span("prefill", context=incoming_context(context), kind=SpanKind.SERVER,
                                                attributes={"pdserve.request_id": request_id,
                                                            "pdserve.prompt_tokens": len(request.prompt_token_ids)}):
            try:
                reply = self._prefill(call_from_proto(request, self.vocab_size, request_id), context)
            except PdserveError as error:
                self.metrics.requests.labels(status_of(error).name).inc()
                raise
        self.metrics.requests.labels(grpc.StatusCode.OK.name).inc()
        return reply

    def _prefill(self, call: PrefillCall, context) -> prefill_pb2.PrefillResponse:
        span = trace.get_current_span()
        sender = GrpcKvSender(self.peers.stub_for(call.decode_address), handle=call.kv_handle,
                              fingerprint=self.compat.fingerprint, kv_dtype=self.compat.kv_dtype,
                              request_id=call.request_id, trace_parent=span, timeout_s=time_remaining_s(context))
        job = PrefillJob(call.request_id, call.prompt_ids, call.sampling, sender)
        self.engine.submit(job)
        context.add_callback(lambda: self.engine.cancel(job))
        while not job.done.wait(_POLL_S):
            if not context.is_active():
                self.engine.cancel(job)
        if job.failed:
            raise Internal("a prefill step failed; the prefill tier's log has the details")
        if job.cancelled:
            raise Cancelled("prefill was cancelled")
        ack = sender.wait()
        transferred_at = time.monotonic()
        record_prefill(span, self.metrics, job, sender, ack, transferred_at)
        return reply_to_proto(job, ack, transferred_at)


@dataclass
class PrefillService:
    """The prefill tier's parts, wired: its engine and the servicer in front of it."""

    engine: PrefillEngine
    servicer: PrefillServicer

    def add_to(self, server: grpc.Server) -> None:
        prefill_pb2_grpc.add_PrefillServicer_to_server(self.servicer, server)


def build_prefill(config: PrefillConfig, registry: CollectorRegistry,
                  runtime: TierRuntime | None = None) -> PrefillService:
    """The engine and servicer of a prefill tier (over `runtime` when given); its metrics go to `registry`."""
    runtime = runtime or build_runtime(config)
    engine = PrefillEngine(runtime.runner, runtime.blocks, chunk_size=config.chunk_size,
                           max_batch_tokens=config.max_batch_tokens)
    registry.register(StatsCollector(engine.stats, PREFILL_STATS, tier="prefill"))
    servicer = PrefillServicer(engine, runtime.compat, runtime.runner.model.config.vocab_size, PrefillMetrics(registry))
    return PrefillService(engine, servicer)


@dataclass
class RunningPrefill:
    server: grpc.Server
    port: int
    engine: PrefillEngine

    def stop(self, grace_s: float = 2.0) -> None:
        self.engine.stop()
        self.server.stop(grace_s).wait()


def start_prefill(config: PrefillConfig, registry: CollectorRegistry | None = None) -> RunningPrefill:
    """Serves the prefill tier; its metrics go to `registry` (a private one when None: nothing serves it)."""
    service = build_prefill(config, registry or CollectorRegistry())
    server = make_server()
    health = add_health(server)
    service.add_to(server)
    port = bind(server, config.host, config.port)
    service.engine.start()
    server.start()
    set_serving(health, [SERVICE_NAME])
    return RunningPrefill(server, port, service.engine)
