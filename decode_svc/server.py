"""The decode service edge: validates, converts protobuf to engine calls, and back."""

import queue
import time
from dataclasses import dataclass

import grpc
from opentelemetry.trace import SpanKind
from prometheus_client import CollectorRegistry

from common.basics.config import DecodeConfig
from common.basics.errors import (
    FailedPrecondition,
    Internal,
    InvalidArgument,
    PdserveError,
)
from common.basics.tokenizer import TextTokenizer
from common.edge.metrics import DECODE_STATS, DecodeMetrics, StatsCollector
from common.edge.proto import compat_to_proto, sampling_from_proto
from common.edge.server import add_health, bind, make_server, maps_errors, set_serving
from common.edge.tracing import incoming_context, tracer
from common.kv import wire as kv_wire
from common.runtime.tier import build_runtime
from decode_svc.convert import event_to_proto, stats_to_proto
from decode_svc.draft import draft_for
from decode_svc.engine import FINISH_ERROR, DecodeEngine
from decode_svc.observe import DecodeObserver
from decode_svc.scheduler import Scheduler
from decode_svc.speculation import SpeculationConfig
from pdserve.v1 import decode_pb2, decode_pb2_grpc

SERVICE_NAME = "pdserve.v1.Decode"
_POLL_S = 0.25


class DecodeServicer(decode_pb2_grpc.DecodeServicer):
    def __init__(self, engine: DecodeEngine, compat, metrics: DecodeMetrics) -> None:
        self.engine = engine
        self.compat = compat
        self.metrics = metrics
        self._tracer = tracer("pdserve.decode")

    @maps_errors
    def GetInfo(self, request, context):
        return compat_to_proto(self.compat)

    @maps_errors
    def Reserve(self, request, context):
        if request.num_prompt_tokens < 1:
            raise InvalidArgument("num_prompt_tokens must be >= 1")
        if request.max_new_tokens < 1:
            raise InvalidArgument("max_new_tokens must be >= 1")
        lease_s = request.lease_ms / 1000 if request.lease_ms else None
        with self._tracer.start_as_current_span("decode.reserve", context=incoming_context(context),
                                                kind=SpanKind.SERVER) as span:
            handle, num_blocks, expires = self.engine.reserve(request.num_prompt_tokens, request.max_new_tokens,
                                                              lease_s)
            span.set_attributes({"pdserve.kv.handle": handle, "pdserve.kv.blocks": num_blocks})
        return decode_pb2.ReserveResponse(handle=handle, num_blocks=num_blocks,
                                          lease_expires_unix_ms=int(expires * 1000),
                                          compat=compat_to_proto(self.compat))

    @maps_errors
    def PushKv(self, request_iterator, context):
        num_chunks, num_bytes, started, handle = 0, 0, None, None
        with self._tracer.start_as_current_span("kv.receive", context=incoming_context(context),
                                                kind=SpanKind.SERVER) as span:
            for chunk in request_iterator:
                started = started or time.monotonic()
                handle = self._check_chunk(chunk, handle)
                payload = kv_wire.KvPayload(chunk.key, chunk.value, chunk.key_scale, chunk.value_scale)
                rows = kv_wire.rows_from_payload(payload, chunk.dtype, tuple(chunk.shape))
                self.engine.receive_kv(handle, chunk.layer, chunk.token_start, rows)
                num_chunks += 1
                num_bytes += payload.num_bytes
            if handle is None:
                raise InvalidArgument("the KV stream was empty")
            if not self.engine.transfer_complete(handle):
                raise FailedPrecondition(f"the KV stream for {handle} ended before every layer had every prompt token")
            span.set_attributes({"pdserve.kv.bytes": num_bytes, "pdserve.kv.pages": num_chunks,
                                 "pdserve.kv.handle": handle})
        self.metrics.kv_received_bytes.inc(num_bytes)
        receive_ms = (time.monotonic() - started) * 1000
        return decode_pb2.PushKvResponse(num_chunks=num_chunks, num_bytes=num_bytes, receive_ms=receive_ms)

    def _check_chunk(self, chunk: decode_pb2.KvChunk, handle: str | None) -> str:
        if handle is not None and chunk.handle != handle:
            raise InvalidArgument(f"one KV stream carries one reservation; got {chunk.handle!r} after {handle!r}")
        if chunk.fingerprint != self.compat.fingerprint:
            raise FailedPrecondition(
                "KV layout mismatch: the sender's compatibility fingerprint differs from this decode instance's "
                f"(model {self.compat.model_id}, kv_dtype {self.compat.kv_dtype}, block_size {self.compat.block_size}); "
                "run prefill and decode with the same model, --kv-dtype and --block-size"
            )
        expected = (chunk.token_end - chunk.token_start, self.compat.num_kv_heads, self.compat.head_dim)
        if chunk.token_end <= chunk.token_start or tuple(chunk.shape) != expected:
            raise InvalidArgument(f"KV chunk shape {tuple(chunk.shape)} does not match tokens "
                                  f"[{chunk.token_start}, {chunk.token_end}): expected {expected}")
        if chunk.dtype != self.compat.kv_dtype:
            raise FailedPrecondition(f"KV chunk dtype {chunk.dtype} differs from this instance's {self.compat.kv_dtype}")
        if kv_wire.checksum(chunk.key, chunk.value, chunk.key_scale, chunk.value_scale) != chunk.crc32:
            raise InvalidArgument(f"KV chunk for layer {chunk.layer}, tokens [{chunk.token_start}, "
                                  f"{chunk.token_end}) failed its CRC-32 check")
        return chunk.handle

    @maps_errors
    def Decode(self, request, context):
        try:
            sampling = sampling_from_proto(request.sampling)
        except ValueError as error:
            raise InvalidArgument(str(error)) from None
        observer = DecodeObserver(self.metrics, incoming_context(context), request.request_id)
        try:
            seq = self.engine.start_decode(
                request.handle, request.first_token_id, request.max_new_tokens, sampling,
                frozenset(request.stop_token_ids), tuple(request.stop), list(request.prompt_token_ids),
                request.speculative if request.HasField("speculative") else None)
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


@dataclass
class RunningDecode:
    server: grpc.Server
    port: int
    engine: DecodeEngine

    def stop(self, grace_s: float = 2.0) -> None:
        self.engine.stop()
        self.server.stop(grace_s).wait()


def start_decode(config: DecodeConfig, registry: CollectorRegistry | None = None) -> RunningDecode:
    """Serves the decode tier; its metrics go to `registry` (a private one when None: nothing serves it)."""
    runtime = build_runtime(config)
    speculation = SpeculationConfig(config.speculative, config.num_speculative_tokens, config.speculative_max_batch,
                                    config.speculative_adaptive)
    engine = DecodeEngine(runtime.runner, runtime.blocks, Scheduler(config.max_batch_size), config.lease_ms / 1000,
                          TextTokenizer(config.model_dir), speculation, draft_for(config, runtime.runner, runtime.blocks))
    server = make_server()
    health = add_health(server)
    registry = registry or CollectorRegistry()
    registry.register(StatsCollector(engine.stats, DECODE_STATS, tier="decode"))
    decode_pb2_grpc.add_DecodeServicer_to_server(DecodeServicer(engine, runtime.compat, DecodeMetrics(registry)),
                                                 server)
    port = bind(server, config.host, config.port)
    engine.start()
    server.start()
    set_serving(health, [SERVICE_NAME])
    return RunningDecode(server, port, engine)
