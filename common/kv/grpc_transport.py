"""The KV transport over gRPC (common/kv/transport.py's protocols between processes): Decode.PushKv, a client
stream of chunks of one layer and token range each, as raw little-endian tensor bytes with dtype, shape and a
CRC-32 (common/kv/wire.py; never pickle).

GrpcKvSender (prefill side) serialises and sends from gRPC's own thread, so transfer overlaps compute. The
stream opens with the first page, under a `kv.transfer` span whose trace context it carries, so the decode
tier's `kv.receive` span is its child. receive_chunks (decode side) checks every chunk against the receiver's
layout before a byte lands in its pool.
"""

import queue
import threading
import time
from collections.abc import Iterable

import grpc
from opentelemetry import trace
from opentelemetry.trace import Span, SpanKind, Status, StatusCode

from common.basics.compat import Compat
from common.basics.errors import FailedPrecondition, InvalidArgument
from common.edge.errors import upstream
from common.edge.server import MESSAGE_MARGIN_BYTES
from common.edge.tracing import outgoing_metadata, tracer
from common.kv import wire
from common.kv.quant import KvRows
from common.kv.transport import KvAck, KvReceiver, SenderState, SendLog
from pdserve.v1 import decode_pb2, decode_pb2_grpc


class GrpcKvSender:
    def __init__(self, stub: decode_pb2_grpc.DecodeStub, *, handle: str, fingerprint: str, kv_dtype: str,
                 request_id: str, trace_parent: Span | None, timeout_s: float | None) -> None:
        self.state = SenderState.SENDING
        self.log = SendLog()
        self._stub = stub
        self._handle = handle
        self._fingerprint = fingerprint
        self._dtype_name = kv_dtype
        self._request_id = request_id
        self._trace_parent = trace_parent
        self._deadline = None if timeout_s is None else time.monotonic() + timeout_s
        self._pending: queue.Queue = queue.Queue()
        self._lock = threading.Lock()
        self._call: grpc.Future | None = None
        self._span: Span | None = None

    def source(self, block_table: list[int]) -> None:
        """Chunks carry the rows send() is given; where they lie locally does not matter here."""

    def release_source(self, free) -> None:
        free()  # the queued rows are copies of the pool's

    def send(self, layer: int, start: int, rows: KvRows) -> None:
        if self.state is not SenderState.SENDING:
            return
        if self._call is None:
            self._open(time.monotonic())
        self.log.note(start, rows.num_tokens)
        self._pending.put((layer, start, rows))

    def close(self) -> None:
        if self.state is SenderState.SENDING:
            self.state = SenderState.CLOSED
            self._pending.put(None)

    def abort(self) -> None:
        with self._lock:
            if self.state is SenderState.ABORTED:
                return
            self.state = SenderState.ABORTED
            if self._call is not None:
                self._call.cancel()
            self._pending.put(None)
        self._end_span(Status(StatusCode.ERROR, "the transfer was aborted"))

    def wait(self) -> KvAck:
        """The receiver's acknowledgement; raises errors.Upstream (its status) if it refused or the stream broke."""
        if self._call is None:
            raise RuntimeError("wait() before any KV page was sent")
        try:
            ack = ack_from_proto(self._call.result())
        except grpc.RpcError as error:
            self._end_span(Status(StatusCode.ERROR, f"{error.code().name}: {error.details()}"))
            raise upstream(error, "the decode tier refused the KV transfer") from None
        self._end_span(Status(StatusCode.OK), ack)
        return ack

    def _open(self, now: float) -> None:
        with self._lock:
            if self.state is not SenderState.SENDING:
                return
            parent = trace.set_span_in_context(self._trace_parent) if self._trace_parent is not None else None
            self._span = tracer("pdserve.prefill").start_span(
                "kv.transfer", context=parent, kind=SpanKind.CLIENT,
                attributes={"pdserve.kv.handle": self._handle})
            timeout_s = None if self._deadline is None else max(self._deadline - now, 0.0)
            self._call = self._stub.PushKv.future(self._chunks(), timeout=timeout_s,
                                                  metadata=outgoing_metadata(self._request_id, self._span))

    def _end_span(self, status: Status, ack: KvAck | None = None) -> None:
        with self._lock:
            span, self._span = self._span, None
        end_transfer_span(span, status, self.log, ack)

    def _chunks(self):
        while (item := self._pending.get()) is not None:
            layer, start, rows = item
            payload = wire.rows_to_payload(rows)
            yield decode_pb2.KvChunk(
                handle=self._handle, fingerprint=self._fingerprint, layer=layer, token_start=start,
                token_end=start + rows.num_tokens, dtype=self._dtype_name, shape=list(rows.key.shape),
                key=payload.key, value=payload.value, key_scale=payload.key_scale, value_scale=payload.value_scale,
                crc32=payload.crc32,
            )


def end_transfer_span(span: Span | None, status: Status, log: SendLog, ack: KvAck | None = None) -> None:
    """Ends a sender's `kv.transfer` span (either transport), with the acknowledged transfer's size and rate."""
    if span is None:
        return
    if ack is not None:
        seconds = max(time.monotonic() - (log.first_sent_at or time.monotonic()), 1e-9)
        span.set_attributes({"pdserve.kv.bytes": ack.num_bytes, "pdserve.kv.pages": ack.num_chunks,
                             "pdserve.kv.mb_per_s": ack.num_bytes / 1e6 / seconds,
                             "pdserve.kv.receive_ms": ack.receive_ms})
    span.set_status(status)
    span.end()


def receive_chunks(chunks: Iterable[decode_pb2.KvChunk], receiver: KvReceiver, compat: Compat) -> tuple[str, KvAck]:
    """Stores one PushKv stream into the receiver after checking every chunk; returns (handle, acknowledgement).
    Raises InvalidArgument / FailedPrecondition saying what was wrong with the stream."""
    num_chunks, num_bytes, started, handle = 0, 0, None, None
    for chunk in chunks:
        started = started or time.monotonic()
        handle = _check_chunk(chunk, handle, compat)
        payload = wire.KvPayload(chunk.key, chunk.value, chunk.key_scale, chunk.value_scale)
        rows = wire.rows_from_payload(payload, chunk.dtype, tuple(chunk.shape))
        if not rows.all_finite():  # a valid checksum over NaN would poison every later step of the sequence
            raise InvalidArgument(f"KV chunk for layer {chunk.layer}, tokens [{chunk.token_start}, {chunk.token_end}) "
                                  "holds NaN or infinite values")
        receiver.receive_kv(handle, chunk.layer, chunk.token_start, rows)
        num_chunks += 1
        num_bytes += payload.num_bytes
    if handle is None:
        raise InvalidArgument("the KV stream was empty")
    if not receiver.transfer_complete(handle):
        raise FailedPrecondition(f"the KV stream for {handle} ended before every layer had every prompt token")
    return handle, KvAck(num_chunks, num_bytes, (time.monotonic() - started) * 1000)


def _check_chunk(chunk: decode_pb2.KvChunk, handle: str | None, compat: Compat) -> str:
    if handle is not None and chunk.handle != handle:
        raise InvalidArgument(f"one KV stream carries one reservation; got {chunk.handle!r} after {handle!r}")
    if chunk.fingerprint != compat.fingerprint:
        raise FailedPrecondition(
            "KV layout mismatch: the sender's compatibility fingerprint differs from this decode instance's "
            f"(model {compat.model_id}, kv_dtype {compat.kv_dtype}, block_size {compat.block_size}); "
            "run prefill and decode with the same model, --kv-dtype and --block-size"
        )
    expected = (chunk.token_end - chunk.token_start, compat.num_kv_heads, compat.head_dim)
    if chunk.token_end <= chunk.token_start or tuple(chunk.shape) != expected:
        raise InvalidArgument(f"KV chunk shape {tuple(chunk.shape)} does not match tokens "
                              f"[{chunk.token_start}, {chunk.token_end}): expected {expected}")
    if chunk.dtype != compat.kv_dtype:
        raise FailedPrecondition(f"KV chunk dtype {chunk.dtype} differs from this instance's {compat.kv_dtype}")
    if wire.checksum(chunk.key, chunk.value, chunk.key_scale, chunk.value_scale) != chunk.crc32:
        raise InvalidArgument(f"KV chunk for layer {chunk.layer}, tokens [{chunk.token_start}, "
                              f"{chunk.token_end}) failed its CRC-32 check")
    return chunk.handle


def max_push_message_bytes(compat: Compat, max_tokens: int) -> int:
    """The largest valid KvChunk: every token a reservation can hold (the model's context), keys, values and, for
    quantised dtypes, one float32 scale per token and KV head each; plus the chunk's other fields."""
    element = wire.DTYPES[compat.kv_dtype].itemsize
    scales = 4 if compat.kv_dtype in ("int8", "fp8") else 0
    per_token = 2 * compat.num_kv_heads * (compat.head_dim * element + scales)
    return max_tokens * per_token + MESSAGE_MARGIN_BYTES


def ack_to_proto(ack: KvAck) -> decode_pb2.PushKvResponse:
    return decode_pb2.PushKvResponse(num_chunks=ack.num_chunks, num_bytes=ack.num_bytes, receive_ms=ack.receive_ms)


def ack_from_proto(reply: decode_pb2.PushKvResponse) -> KvAck:
    return KvAck(reply.num_chunks, reply.num_bytes, reply.receive_ms)
