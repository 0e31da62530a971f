"""The decode service edge: validates, converts protobuf to engine calls, and back."""

import queue
import time
from dataclasses import dataclass

import grpc

from common import kv_wire
from common.config import DecodeConfig
from common.errors import FailedPrecondition, Internal, InvalidArgument
from common.grpc_util import add_health, make_server, maps_errors, set_serving
from common.proto_convert import compat_to_proto, sampling_from_proto
from common.tier import bind, build_runtime
from common.tokenizer import TextTokenizer
from common.tracing import incoming_context, tracer
from decode_svc.convert import event_to_proto, stats_to_proto
from decode_svc.engine import FINISH_ERROR, DecodeEngine
from decode_svc.scheduler import Scheduler
from pdserve.v1 import decode_pb2, decode_pb2_grpc

SERVICE_NAME = "pdserve.v1.Decode"
_POLL_S = 0.25


class DecodeServicer(decode_pb2_grpc.DecodeServicer):
    def __init__(self, engine: DecodeEngine, compat) -> None:
        self.engine = engine
        self.compat = compat
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
        handle, num_blocks, expires = self.engine.reserve(request.num_prompt_tokens, request.max_new_tokens, lease_s)
        return decode_pb2.ReserveResponse(handle=handle, num_blocks=num_blocks,
                                          lease_expires_unix_ms=int(expires * 1000),
                                          compat=compat_to_proto(self.compat))

    @maps_errors
    def PushKv(self, request_iterator, context):
        num_chunks, num_bytes, started, handle = 0, 0, None, None
        with self._tracer.start_as_current_span("decode.kv_receive", context=incoming_context(context)) as span:
            for chunk in request_iterator:
                started = started or time.monotonic()
                handle = self._check_chunk(chunk, handle)
                shape = tuple(chunk.shape)
                key = kv_wire.from_bytes(chunk.key, chunk.dtype, shape)
                value = kv_wire.from_bytes(chunk.value, chunk.dtype, shape)
                self.engine.receive_kv(handle, chunk.layer, chunk.token_start, key, value)
                num_chunks += 1
                num_bytes += len(chunk.key) + len(chunk.value)
            if handle is None:
                raise InvalidArgument("the KV stream was empty")
            if not self.engine.transfer_complete(handle):
                raise FailedPrecondition(f"the KV stream for {handle} ended before every layer had every prompt token")
            span.set_attribute("pdserve.kv.bytes", num_bytes)
            span.set_attribute("pdserve.kv.chunks", num_chunks)
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
        if kv_wire.checksum(chunk.key, chunk.value) != chunk.crc32:
            raise InvalidArgument(f"KV chunk for layer {chunk.layer}, tokens [{chunk.token_start}, "
                                  f"{chunk.token_end}) failed its CRC-32 check")
        return chunk.handle

    @maps_errors
    def Decode(self, request, context):
        try:
            sampling = sampling_from_proto(request.sampling)
        except ValueError as error:
            raise InvalidArgument(str(error)) from None
        with self._tracer.start_as_current_span("decode", context=incoming_context(context)) as span:
            seq = self.engine.start_decode(request.handle, request.first_token_id, request.max_new_tokens,
                                           sampling, frozenset(request.stop_token_ids), tuple(request.stop))
            context.add_callback(lambda: self.engine.cancel(seq))
            try:
                while True:
                    try:
                        event = seq.outbox.get(timeout=_POLL_S)
                    except queue.Empty:
                        if not context.is_active():
                            return
                        continue
                    if event.finish_reason == FINISH_ERROR:
                        raise Internal("a decode step failed; the decode tier's log has the details")
                    yield event_to_proto(event)
                    if event.finish_reason:
                        span.set_attribute("pdserve.decode.tokens", len(seq.tokens))
                        return
            finally:
                self.engine.cancel(seq)

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


def start_decode(config: DecodeConfig) -> RunningDecode:
    runtime = build_runtime(config)
    engine = DecodeEngine(runtime.runner, runtime.blocks, Scheduler(config.max_batch_size), config.lease_ms / 1000,
                          TextTokenizer(config.model_dir))
    server = make_server()
    health = add_health(server)
    decode_pb2_grpc.add_DecodeServicer_to_server(DecodeServicer(engine, runtime.compat), server)
    port = bind(server, config.host, config.port)
    engine.start()
    server.start()
    set_serving(health, [SERVICE_NAME])
    return RunningDecode(server, port, engine)
