"""Generation: one request's legs across the tiers, as the gateway drives them.

  1. Reserve on a decode instance D (least loaded first; a full one is skipped): blocks + lease.
  2. Prefill on a prefill instance P with D's handle: P pushes the KV straight to D, returns token 1.
  3. Decode on D: tokens stream back until EOS or max_new_tokens.
cancel() cancels whichever leg is in flight; a reservation that never reached Decode is released.
The gateway never carries KV bytes. Each leg is a span under the request's (route, prefill.call,
decode.call, release) whose trace context travels in that call's metadata.
"""

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import grpc
from opentelemetry.trace import Span, SpanKind

from common.edge.proto import sampling_to_proto
from common.edge.tracing import child_span, outgoing_metadata
from gateway.router import Router
from gateway.validation import GenerationSpec
from pdserve.v1 import decode_pb2, decode_pb2_grpc, prefill_pb2, prefill_pb2_grpc

_RELEASE_TIMEOUT_S = 2.0
_NEXT_DECODE_CODES = (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAVAILABLE)
FINISH_REASON_NAMES = {1: "stop", 2: "length", 3: "cancelled"}


class TierError(Exception):
    """A downstream tier answered with an error; code and message go back to the client."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class GenerationEvent:
    token_ids: list[int]
    finish_reason: str | None = None
    speculation: decode_pb2.SpeculationStats | None = None  # on the last event, when it speculated


@dataclass
class Stubs:
    prefill: dict[str, prefill_pb2_grpc.PrefillStub]
    decode: dict[str, decode_pb2_grpc.DecodeStub]


@dataclass
class PhaseTimings:
    queue_ms: float = 0.0
    prefill_ms: float = 0.0
    kv_transfer_ms: float = 0.0


class Generation:
    def __init__(self, spec: GenerationSpec, router: Router, stubs: Stubs, *, eos_token_ids: frozenset[int],
                 lease_ms: int, deadline: float | None, trace_parent: Span) -> None:
        self.spec = spec
        self.router = router
        self.stubs = stubs
        self.eos_token_ids = eos_token_ids
        self.lease_ms = lease_ms
        self.deadline = deadline  # monotonic seconds, or None for no deadline
        self.trace_parent = trace_parent
        self.timings = PhaseTimings()
        self._calls: list = []
        self._cancelled = False
        self._lock = threading.Lock()

    def cancel(self) -> None:
        with self._lock:
            self._cancelled = True
            calls = list(self._calls)
        for call in calls:
            call.cancel()

    def run(self) -> Iterator[GenerationEvent]:
        started = time.monotonic()
        with child_span("route", self.trace_parent) as span:
            address, handle = self._reserve(span)
            prefill_address = self.router.pick_prefill()
            span.set_attributes({"pdserve.decode.address": address, "pdserve.prefill.address": prefill_address,
                                 "pdserve.kv.handle": handle})
        decode_finished = False
        try:
            with self.router.decoding(address):
                first = self._prefill(prefill_address, address, handle, started)
                yield GenerationEvent([first])
                if first in self.eos_token_ids or self.spec.max_new_tokens == 1:
                    yield GenerationEvent([], "stop" if first in self.eos_token_ids else "length")
                    return
                for event in self._decode(address, handle, first):
                    decode_finished = event.finish_reason is not None
                    yield event
        finally:
            self.cancel()
            if not decode_finished:
                self._release(address, handle)

    def _reserve(self, span: Span) -> tuple[str, str]:
        request = decode_pb2.ReserveRequest(request_id=self.spec.request_id,
                                            num_prompt_tokens=len(self.spec.prompt_ids),
                                            max_new_tokens=self.spec.max_new_tokens, lease_ms=self.lease_ms)
        refusals = []
        for address in self.router.decode_order():
            try:
                reply = self._unary(self.stubs.decode[address].Reserve, request, span)
                return address, reply.handle
            except grpc.RpcError as error:
                if error.code() not in _NEXT_DECODE_CODES:
                    raise TierError(error.code(), f"decode instance {address}: {error.details()}") from None
                refusals.append((error.code(), f"{address}: {error.details()}"))
        code = grpc.StatusCode.RESOURCE_EXHAUSTED
        if all(c == grpc.StatusCode.UNAVAILABLE for c, _ in refusals):
            code = grpc.StatusCode.UNAVAILABLE
        raise TierError(code, "no decode instance can take this request now ("
                        + "; ".join(m for _, m in refusals) + ")")

    def _prefill(self, address: str, decode_address: str, handle: str, started: float) -> int:
        request = prefill_pb2.PrefillRequest(
            request_id=self.spec.request_id, prompt_token_ids=self.spec.prompt_ids,
            sampling=sampling_to_proto(self.spec.sampling), decode_address=decode_address, kv_handle=handle,
        )
        with (self.router.prefilling(address, len(self.spec.prompt_ids)),
              child_span("prefill.call", self.trace_parent, kind=SpanKind.CLIENT) as span):
            sent = time.monotonic()
            try:
                reply = self._unary(self.stubs.prefill[address].Prefill, request, span)
            except grpc.RpcError as error:
                raise TierError(error.code(), f"prefill instance {address}: {error.details()}") from None
            span.set_attributes({"pdserve.prefill.queue_ms": reply.queue_ms,
                                 "pdserve.prefill.compute_ms": reply.compute_ms,
                                 "pdserve.kv.transfer_tail_ms": reply.kv_transfer_ms,
                                 "pdserve.kv.bytes": reply.kv_bytes, "pdserve.prefill.chunks": reply.num_chunks})
        self.timings = PhaseTimings(queue_ms=(sent - started) * 1000 + reply.queue_ms,
                                    prefill_ms=reply.compute_ms, kv_transfer_ms=reply.kv_transfer_ms)
        return reply.first_token_id

    def _decode(self, address: str, handle: str, first: int) -> Iterator[GenerationEvent]:
        request = decode_pb2.DecodeRequest(
            handle=handle, request_id=self.spec.request_id, first_token_id=first,
            max_new_tokens=self.spec.max_new_tokens, sampling=sampling_to_proto(self.spec.sampling),
            stop_token_ids=sorted(self.eos_token_ids), stop=self.spec.stop, prompt_token_ids=self.spec.prompt_ids,
            speculative=self.spec.speculative,
        )
        with child_span("decode.call", self.trace_parent, kind=SpanKind.CLIENT) as span:
            stream = self.stubs.decode[address].Decode(request, timeout=self._remaining(),
                                                       metadata=outgoing_metadata(self.spec.request_id, span))
            self._track(stream)
            try:
                for reply in stream:
                    yield GenerationEvent(list(reply.token_ids), FINISH_REASON_NAMES.get(reply.finish_reason),
                                          reply.speculation if reply.HasField("speculation") else None)
            except grpc.RpcError as error:
                raise TierError(error.code(), f"decode instance {address}: {error.details()}") from None

    def _unary(self, method, request, span: Span):
        future = method.future(request, timeout=self._remaining(),
                               metadata=outgoing_metadata(self.spec.request_id, span))
        self._track(future)
        try:
            return future.result()
        except grpc.FutureCancelledError:
            raise TierError(grpc.StatusCode.CANCELLED, "the request was cancelled") from None

    def _track(self, call) -> None:
        with self._lock:
            self._calls.append(call)
            cancelled = self._cancelled
        if cancelled:
            call.cancel()

    def _remaining(self) -> float | None:
        return None if self.deadline is None else max(self.deadline - time.monotonic(), 0.0)

    def _release(self, address: str, handle: str) -> None:
        with child_span("release", self.trace_parent, kind=SpanKind.CLIENT) as span:
            try:
                self.stubs.decode[address].Release(decode_pb2.ReleaseRequest(handle=handle),
                                                   timeout=_RELEASE_TIMEOUT_S,
                                                   metadata=outgoing_metadata(self.spec.request_id, span))
            except grpc.RpcError as error:
                # The lease frees the blocks if the decode instance cannot be reached now.
                span.set_attribute("error.type", error.code().name)
