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
    InvalidArgument,
    PdserveError,
    Unavailable,
)
from common.edge.metrics import PREFILL_STATS, PrefillMetrics, StatsCollector
from common.edge.proto import compat_from_proto, compat_to_proto, sampling_from_proto
from common.edge.server import (
    REQUEST_ID_KEY,
    add_health,
    bind,
    make_channel,
    make_server,
    maps_errors,
    metadata_value,
    set_serving,
    status_of,
    time_remaining_s,
)
from common.edge.tracing import incoming_context, tracer
from common.runtime.tier import build_runtime
from pdserve.v1 import decode_pb2, decode_pb2_grpc, prefill_pb2, prefill_pb2_grpc
from prefill_svc.engine import PrefillEngine, PrefillJob
from prefill_svc.kv_sender import GrpcKvSender
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
        return prefill_pb2.PrefillStats(**vars(self.engine.stats()))

    @maps_errors
    def Prefill(self, request, context):
        request_id = request.request_id or metadata_value(context, REQUEST_ID_KEY) or ""
        with self._tracer.start_as_current_span("prefill", context=incoming_context(context), kind=SpanKind.SERVER,
                                                attributes={"pdserve.request_id": request_id,
                                                            "pdserve.prompt_tokens": len(request.prompt_token_ids)}):
            try:
                self._validate(request)
                reply = self._prefill(request, request_id, context)
            except PdserveError as error:
                self.metrics.requests.labels(status_of(error).name).inc()
                raise
        self.metrics.requests.labels(grpc.StatusCode.OK.name).inc()
        return reply

    def _prefill(self, request, request_id: str, context) -> prefill_pb2.PrefillResponse:
        span = trace.get_current_span()
        sender = GrpcKvSender(self.peers.stub_for(request.decode_address), handle=request.kv_handle,
                              fingerprint=self.compat.fingerprint, kv_dtype=self.compat.kv_dtype,
                              request_id=request_id, trace_parent=span, timeout_s=time_remaining_s(context))
        job = PrefillJob(request_id, list(request.prompt_token_ids), sampling_from_proto(request.sampling), sender)
        self.engine.submit(job)
        context.add_callback(lambda: self.engine.cancel(job))
        while not job.done.wait(_POLL_S):
            if not context.is_active():
                self.engine.cancel(job)
        if job.failed:
            raise Internal("a prefill step failed; the prefill tier's log has the details")
        if job.cancelled:
            raise Cancelled("prefill was cancelled")
        try:
            ack = sender.wait()
        except grpc.RpcError as error:
            self.metrics.requests.labels(error.code().name).inc()
            context.abort(error.code(), f"decode tier refused the KV transfer: {error.details()}")
        transferred_at = time.monotonic()
        record_prefill(span, self.metrics, job, sender, ack, transferred_at)
        return prefill_pb2.PrefillResponse(
            first_token_id=job.first_token,
            queue_ms=(job.started_at - job.enqueued_at) * 1000,
            compute_ms=(job.computed_at - job.started_at) * 1000,
            kv_transfer_ms=(transferred_at - job.computed_at) * 1000,
            kv_bytes=ack.num_bytes,
            kv_chunks=ack.num_chunks,
            num_chunks=job.num_chunks,
        )

    def _validate(self, request: prefill_pb2.PrefillRequest) -> None:
        if not request.prompt_token_ids:
            raise InvalidArgument("prompt_token_ids is empty")
        bad = [t for t in request.prompt_token_ids if t >= self.vocab_size]
        if bad:
            raise InvalidArgument(f"token ids {bad[:5]} are outside the vocabulary [0, {self.vocab_size})")
        if not request.decode_address or not request.kv_handle:
            raise InvalidArgument("decode_address and kv_handle name where the KV goes; both are required")
        try:
            sampling_from_proto(request.sampling)
        except ValueError as error:
            raise InvalidArgument(str(error)) from None


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
    runtime = build_runtime(config)
    engine = PrefillEngine(runtime.runner, runtime.blocks, chunk_size=config.chunk_size,
                           max_batch_tokens=config.max_batch_tokens)
    server = make_server()
    health = add_health(server)
    registry = registry or CollectorRegistry()
    registry.register(StatsCollector(engine.stats, PREFILL_STATS, tier="prefill"))
    servicer = PrefillServicer(engine, runtime.compat, runtime.runner.model.config.vocab_size, PrefillMetrics(registry))
    prefill_pb2_grpc.add_PrefillServicer_to_server(servicer, server)
    port = bind(server, config.host, config.port)
    engine.start()
    server.start()
    set_serving(health, [SERVICE_NAME])
    return RunningPrefill(server, port, engine)
