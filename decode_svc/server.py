"""The decode service edge: validates, converts protobuf to engine calls, and back."""

import queue
import uuid
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health
from opentelemetry.trace import SpanKind
from prometheus_client import CollectorRegistry

from common.basics.config import DecodeConfig
from common.basics.errors import FailedPrecondition, Internal, PdserveError, Unavailable
from common.basics.grammar import model_grammars
from common.basics.tokenizer import TextTokenizer
from common.edge.errors import maps_errors
from common.edge.metrics import DECODE_STATS, DecodeMetrics, StatsCollector
from common.edge.proto import cache_summary_to_proto, compat_to_proto
from common.edge.server import Tls, add_health, bind, drain, make_server, set_serving
from common.edge.tracing import incoming_context, tracer
from common.kv.grpc_transport import (
    ack_to_proto,
    max_push_message_bytes,
    receive_chunks,
)
from common.kv.nixl_serve import serve_writes
from common.kv.nixl_transport import NixlKvAgent, pool_tensors
from common.runtime.tier import TierRuntime, build_runtime
from decode_svc.convert import (
    decode_call_from_proto,
    event_to_proto,
    reservation_to_proto,
    reserve_from_proto,
    stats_to_proto,
)
from decode_svc.draft import draft_for
from decode_svc.engine import FINISH_ERROR, FINISH_SHUTDOWN, DecodeEngine
from decode_svc.observe import DecodeObserver
from decode_svc.scheduler import Scheduler
from decode_svc.speculation import SpeculationConfig
from pdserve.v1 import decode_pb2, decode_pb2_grpc

SERVICE_NAME = "pdserve.v1.Decode"
_POLL_S = 0.25


class DecodeServicer(decode_pb2_grpc.DecodeServicer):
    def __init__(self, engine: DecodeEngine, compat, metrics: DecodeMetrics, weight_format: str = "",
                 nixl: NixlKvAgent | None = None) -> None:
        self.engine = engine
        self.compat = compat
        self.weight_format = weight_format  # reported in cache summaries
        self.metrics = metrics
        self.nixl = nixl  # --kv-transport nixl: the agent over this instance's pool; None: KV comes by PushKv
        self.kv_transport = "grpc" if nixl is None else "nixl"
        self._nixl_metadata = nixl.metadata() if nixl is not None else b""
        self._tracer = tracer("pdserve.decode")

    @maps_errors
    def GetInfo(self, request, context):
        info = compat_to_proto(self.compat)
        info.kv_transport = self.kv_transport
        return info

    def _transport_is(self, transport: str) -> None:
        if self.kv_transport != transport:
            raise FailedPrecondition(f"this decode instance receives KV over {self.kv_transport} "
                                     f"(--kv-transport {self.kv_transport}), not {transport}; start prefill and "
                                     "decode with the same --kv-transport")

    @maps_errors
    def Reserve(self, request, context):
        call = reserve_from_proto(request)
        with self._tracer.start_as_current_span("decode.reserve", context=incoming_context(context),
                                                kind=SpanKind.SERVER) as span:
            reserved = self.engine.reserve(call.num_prompt_tokens, call.max_new_tokens, call.lease_s, call.prompt_ids)
            span.set_attributes({"pdserve.kv.handle": reserved.handle, "pdserve.kv.blocks": reserved.num_blocks,
                                 "pdserve.kv.cached_tokens": reserved.num_cached_tokens})
        return reservation_to_proto(reserved, self.compat)

    @maps_errors
    def PushKv(self, request_iterator, context):
        self._transport_is("grpc")
        with self._tracer.start_as_current_span("kv.receive", context=incoming_context(context),
                                                kind=SpanKind.SERVER) as span:
            handle, ack = receive_chunks(request_iterator, self.engine, self.compat)
            span.set_attributes({"pdserve.kv.bytes": ack.num_bytes, "pdserve.kv.pages": ack.num_chunks,
                                 "pdserve.kv.handle": handle})
        self.metrics.kv_received_bytes.inc(ack.num_bytes)
        return ack_to_proto(ack)

    @maps_errors
    def WriteKv(self, request_iterator, context):
        self._transport_is("nixl")
        with self._tracer.start_as_current_span("kv.receive", context=incoming_context(context),
                                                kind=SpanKind.SERVER) as span:
            def committed(handle, ack):
                span.set_attributes({"pdserve.kv.bytes": ack.num_bytes, "pdserve.kv.pages": ack.num_chunks,
                                     "pdserve.kv.handle": handle, "pdserve.kv.transport": "nixl"})
                self.metrics.kv_received_bytes.inc(ack.num_bytes)

            yield from serve_writes(request_iterator, context, self.engine, self.nixl, self._nixl_metadata,
                                    self.compat, committed)

    @maps_errors
    def Decode(self, request, context):
        call = decode_call_from_proto(request)
        observer = DecodeObserver(self.metrics, incoming_context(context), call.request_id)
        try:
            seq = self.engine.start_decode(call.handle, call.first_token, call.max_new_tokens, call.sampling,
                                           call.stop_token_ids, call.stop_strings, call.prompt_ids, call.speculate,
                                           call.first_step, call.prefill_locally)
            observer.started(seq)
            context.add_callback(lambda: self.engine.cancel(seq))
            try:
                yield from self._stream(seq, context, observer)
            finally:
                self.engine.cancel(seq)
        except PdserveError as error:
            observer.error(str(error))
            raise
        finally:
            observer.end()

    def _stream(self, seq, context, observer: DecodeObserver):
        while True:
            try:
                event = seq.outbox.get(timeout=_POLL_S)
            except queue.Empty:
                if not context.is_active():
                    return
                continue
            if event.finish_reason == FINISH_ERROR:
                raise Internal("a decode step failed; the decode tier's log has the details")
            if event.finish_reason == FINISH_SHUTDOWN:  # not a finish the client asked for: resumable elsewhere
                raise Unavailable("the decode instance is shutting down; resume the request on another")
            observer.event(event)
            yield event_to_proto(event)
            if event.finish_reason:
                return

    @maps_errors
    def Release(self, request, context):
        return decode_pb2.ReleaseResponse(released=self.engine.release(request.handle))

    @maps_errors
    def Stats(self, request, context):
        return stats_to_proto(self.engine.stats())

    @maps_errors
    def GetCacheSummary(self, request, context):
        return cache_summary_to_proto(self.engine.cache_summary(request.known_version), self.compat,
                                      self.weight_format)


@dataclass
class DecodeService:
    """The decode tier's parts, wired: its engine, the servicer in front of it, and the largest message a valid
    caller sends it (a KV chunk of a whole context)."""

    engine: DecodeEngine
    servicer: DecodeServicer
    max_receive_bytes: int

    def add_to(self, server: grpc.Server) -> None:
        decode_pb2_grpc.add_DecodeServicer_to_server(self.servicer, server)


def build_decode(config: DecodeConfig, registry: CollectorRegistry, runtime: TierRuntime | None = None) -> DecodeService:
    """The engine and servicer of a decode tier (over `runtime`'s model and pool when given: the colocated
    mode shares the prefill side's model); its metrics go to `registry`."""
    runtime = runtime or build_runtime(config)
    speculation = SpeculationConfig(config.speculative, config.num_speculative_tokens, config.speculative_max_batch,
                                    config.speculative_adaptive)
    engine = DecodeEngine(runtime.runner, runtime.blocks, Scheduler(config.max_batch_size), config.lease_ms / 1000,
                          TextTokenizer(config.model_dir), speculation, draft_for(config, runtime.runner, runtime.blocks),
                          max_lease_s=config.max_lease_ms / 1000, kv_growth=config.kv_growth,
                          grammars=model_grammars(config.model_dir, runtime.runner.model.config),
                          step_prefill_tokens=config.step_prefill_tokens, fence_s=config.nixl_fence_ms / 1000)
    registry.register(StatsCollector(engine.stats, DECODE_STATS, tier="decode"))
    context = runtime.runner.model.config.max_position_embeddings
    nixl = None
    if config.kv_transport == "nixl":
        nixl = NixlKvAgent(f"decode-{uuid.uuid4().hex[:12]}", pool_tensors(runtime.runner.kv), config.block_size)
    return DecodeService(engine, DecodeServicer(engine, runtime.compat, DecodeMetrics(registry), config.weights, nixl),
                         max_push_message_bytes(runtime.compat, context))


@dataclass
class RunningDecode:
    server: grpc.Server
    port: int
    engine: DecodeEngine
    health: health.HealthServicer

    def drain(self, timeout_s: float) -> bool:
        """SIGTERM's first half: NOT_SERVING at once, nothing new admitted, what is held finishes (up to
        timeout_s). Returns whether everything finished."""
        self.engine.draining = True
        return drain(self.health, [SERVICE_NAME], self.engine.busy, timeout_s)

    def stop(self, grace_s: float = 2.0) -> None:
        self.engine.stop()
        self.server.stop(grace_s).wait()


def start_decode(config: DecodeConfig, registry: CollectorRegistry | None = None) -> RunningDecode:
    """Serves the decode tier; its metrics go to `registry` (a private one when None: nothing serves it)."""
    tls = Tls.from_files(config.tls_cert, config.tls_key, config.tls_ca)
    service = build_decode(config, registry or CollectorRegistry())
    server = make_server(service.max_receive_bytes)
    health = add_health(server)
    service.add_to(server)
    port = bind(server, config.host, config.port, tls.server_credentials() if tls else None)
    service.engine.start()
    server.start()
    set_serving(health, [SERVICE_NAME])
    return RunningDecode(server, port, service.engine, health)
