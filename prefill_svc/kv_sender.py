"""KvSender: pushes one prompt's KV pages to a decode instance while the prefill is still computing.

The engine hands each layer's fresh K/V to `send` as it is computed, as the prefill pool stored it
(quantised once there, for int8 / fp8: the codes and scales travel unchanged); a gRPC client stream
(Decode.PushKv) serialises and sends them from its own thread, so transfer overlaps compute.
The stream opens with the first page, under a `kv.transfer` span whose trace context it carries, so the
decode tier's `kv.receive` span is its child. The sender notes when each chunk's pages were handed over:
the prefill tier's chunk spans come from those times, without the engine knowing about tracing.
"""

import enum
import queue
import threading
import time
from dataclasses import dataclass
from typing import Protocol

import grpc
from opentelemetry import trace
from opentelemetry.trace import Span, SpanKind, Status, StatusCode

from common.edge.tracing import outgoing_metadata, tracer
from common.kv import wire as kv_wire
from common.kv.quant import KvRows
from pdserve.v1 import decode_pb2, decode_pb2_grpc


class SenderState(enum.Enum):
    SENDING = "sending"  # accepting chunks
    CLOSED = "closed"  # every chunk handed over; waiting for the receiver's acknowledgement
    ABORTED = "aborted"  # cancelled; the receiver sees the stream cancelled


class KvSender(Protocol):
    state: SenderState

    def send(self, layer: int, start: int, rows: KvRows) -> None: ...
    def close(self) -> None: ...
    def abort(self) -> None: ...
    def wait(self) -> decode_pb2.PushKvResponse: ...


@dataclass
class ChunkTiming:
    """When the pages of one prompt chunk (tokens [token_start, token_start + num_tokens)) were handed
    over: first_s at its first layer, last_s at its last (time.monotonic())."""

    token_start: int
    num_tokens: int
    first_s: float
    last_s: float


class GrpcKvSender:
    def __init__(self, stub: decode_pb2_grpc.DecodeStub, *, handle: str, fingerprint: str, kv_dtype: str,
                 request_id: str, trace_parent: Span | None, timeout_s: float | None) -> None:
        self.state = SenderState.SENDING
        self.chunk_timings: dict[int, ChunkTiming] = {}  # by token_start, in computation order
        self.first_sent_at: float | None = None
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

    def send(self, layer: int, start: int, rows: KvRows) -> None:
        if self.state is not SenderState.SENDING:
            return
        now = time.monotonic()
        if self._call is None:
            self._open(now)
        timing = self.chunk_timings.get(start)
        if timing is None:
            self.chunk_timings[start] = ChunkTiming(start, rows.num_tokens, now, now)
        else:
            timing.last_s = now
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

    def wait(self) -> decode_pb2.PushKvResponse:
        """The receiver's acknowledgement; raises grpc.RpcError if it refused or the stream broke."""
        if self._call is None:
            raise RuntimeError("wait() before any KV page was sent")
        try:
            ack = self._call.result()
        except grpc.RpcError as error:
            self._end_span(Status(StatusCode.ERROR, f"{error.code().name}: {error.details()}"))
            raise
        self._end_span(Status(StatusCode.OK), ack)
        return ack

    def _open(self, now: float) -> None:
        with self._lock:
            if self.state is not SenderState.SENDING:
                return
            self.first_sent_at = now
            parent = trace.set_span_in_context(self._trace_parent) if self._trace_parent is not None else None
            self._span = tracer("pdserve.prefill").start_span(
                "kv.transfer", context=parent, kind=SpanKind.CLIENT,
                attributes={"pdserve.kv.handle": self._handle})
            timeout_s = None if self._deadline is None else max(self._deadline - now, 0.0)
            self._call = self._stub.PushKv.future(self._chunks(), timeout=timeout_s,
                                                  metadata=outgoing_metadata(self._request_id, self._span))

    def _end_span(self, status: Status, ack: decode_pb2.PushKvResponse | None = None) -> None:
        with self._lock:
            span, self._span = self._span, None
        if span is None:
            return
        if ack is not None:
            seconds = max(time.monotonic() - self.first_sent_at, 1e-9)
            span.set_attributes({"pdserve.kv.bytes": ack.num_bytes, "pdserve.kv.pages": ack.num_chunks,
                                 "pdserve.kv.mb_per_s": ack.num_bytes / 1e6 / seconds,
                                 "pdserve.kv.receive_ms": ack.receive_ms})
        span.set_status(status)
        span.end()

    def _chunks(self):
        while (item := self._pending.get()) is not None:
            layer, start, rows = item
            payload = kv_wire.rows_to_payload(rows)
            yield decode_pb2.KvChunk(
                handle=self._handle,
                fingerprint=self._fingerprint,
                layer=layer,
                token_start=start,
                token_end=start + rows.num_tokens,
                dtype=self._dtype_name,
                shape=list(rows.key.shape),
                key=payload.key,
                value=payload.value,
                key_scale=payload.key_scale,
                value_scale=payload.value_scale,
                crc32=payload.crc32,
            )


def is_cancelled(error: grpc.RpcError) -> bool:
    return isinstance(error, grpc.Call) and error.code() == grpc.StatusCode.CANCELLED
