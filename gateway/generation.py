"""Generation: one request's legs across the tiers, as the gateway drives them.

  1. Reserve on a decode instance D (least loaded first; a full one is skipped): blocks + lease.
  2. Prefill on a prefill instance P with D's handle: P pushes the KV straight to D, returns token 1.
  3. Decode on D: tokens stream back until EOS or max_new_tokens.
If an instance fails under a leg (UNAVAILABLE: dead, draining, unreachable), the request resumes elsewhere:
the prompt plus every token already sent is prefilled again for another decode instance (or the same prompt
on another prefill instance), drawing from the same position, so the client's stream goes on with no token
repeated or missing; at most max_retries times, and decode moves are counted in num_migrations.
cancel() cancels whichever leg is in flight; a reservation that never reached Decode is released.
The gateway never carries KV bytes. Each leg is a span under the request's (route, prefill.call,
decode.call, release) whose trace context travels with the call. The tiers are reached through `Tiers`
(gateway/tiers.py): gRPC in service, engines in the same process in the unit tests.
"""

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

from opentelemetry.trace import Span, SpanKind

from common.basics.errors import Unavailable, Upstream
from common.edge.tracing import child_span
from gateway.router import Router
from gateway.tiers import CallContext, DecodeArgs, DecodeChunk, GenerationSpec, Tiers

_NEXT_DECODE = ("RESOURCE_EXHAUSTED", "UNAVAILABLE")  # a decode instance that cannot take it: try the next
_RESUMABLE = ("UNAVAILABLE",)  # an instance failed under a leg: resume the request elsewhere
MAX_RETRIES = 3


@dataclass
class PhaseTimings:
    queue_ms: float = 0.0
    prefill_ms: float = 0.0
    kv_transfer_ms: float = 0.0


class Generation:
    def __init__(self, spec: GenerationSpec, router: Router, tiers: Tiers, *, eos_token_ids: frozenset[int],
                 lease_ms: int, deadline: float | None, trace_parent: Span, max_retries: int = MAX_RETRIES) -> None:
        self.spec = spec
        self.router = router
        self.tiers = tiers
        self.eos_token_ids = eos_token_ids
        self.lease_ms = lease_ms
        self.deadline = deadline  # monotonic seconds, or None for no deadline
        self.trace_parent = trace_parent
        self.timings = PhaseTimings()
        self.max_retries = max_retries
        self.num_migrations = 0  # decode instances left mid-request because they failed
        self._sent: list[int] = []  # every token yielded so far, across legs
        self._leg_addresses: tuple[str, ...] = ()  # (prefill, decode) of the leg in progress
        self._calls: list = []
        self._cancelled = False
        self._lock = threading.Lock()

    def cancel(self) -> None:
        with self._lock:
            self._cancelled = True
        self._cancel_calls()

    def _cancel_calls(self) -> None:
        """Ends whatever call of the current leg is in flight."""
        with self._lock:
            calls, self._calls = self._calls, []
        for call in calls:
            call.cancel()

    def run(self) -> Iterator[DecodeChunk]:
        started, retries, avoid = time.monotonic(), 0, frozenset()
        while True:
            try:
                yield from self._leg(started, avoid)
                return
            except Upstream as error:
                if error.status not in _RESUMABLE or retries >= self.max_retries or self._cancelled:
                    raise
                retries += 1
                avoid = self._failed_instances()

    def _leg(self, started: float, avoid: frozenset[str]) -> Iterator[DecodeChunk]:
        """Reserve, prefill (the prompt and whatever was sent before), decode; one attempt."""
        if len(self._sent) >= self.spec.max_new_tokens:  # everything was sent before a failure ended the stream
            yield DecodeChunk([], "length")
            return
        resumed, self._leg_addresses = bool(self._sent), ()
        with child_span("route", self.trace_parent) as span:
            address, handle = self._reserve(span, avoid)
            prefill_address = self.router.pick_prefill(avoid)
            span.set_attributes({"pdserve.decode.address": address, "pdserve.prefill.address": prefill_address,
                                 "pdserve.kv.handle": handle, "pdserve.resumed_after_tokens": len(self._sent)})
        self._leg_addresses = (prefill_address, address)
        decode_finished = False
        try:
            with self.router.decoding(address):
                first = self._prefill(prefill_address, address, handle, started)
                self.num_migrations += resumed
                self._sent.append(first)
                yield DecodeChunk([first])
                if first in self.eos_token_ids or len(self._sent) >= self.spec.max_new_tokens:
                    yield DecodeChunk([], "stop" if first in self.eos_token_ids else "length")
                    return
                for chunk in self._decode(address, handle, first):
                    decode_finished = chunk.finish_reason is not None
                    self._sent += chunk.token_ids
                    yield chunk
        finally:
            self._cancel_calls()
            if not decode_finished:
                with child_span("release", self.trace_parent, kind=SpanKind.CLIENT) as span:
                    self.tiers.release(address, handle, self._context(span))

    def _failed_instances(self) -> frozenset[str]:
        """The instances of the failed leg that no longer serve (both are checked now); the next leg avoids them."""
        return frozenset(a for a in self._leg_addresses if not self.router.recheck(a))

    def _reserve(self, span: Span, avoid: frozenset[str]) -> tuple[str, str]:
        refusals = []
        for address in self.router.decode_order(avoid):
            call = self.tiers.reserve(address, self._prompt_len(), self.spec.max_new_tokens - len(self._sent),
                                      self.lease_ms, self._context(span))
            try:
                return address, self._track(call).result()
            except Upstream as error:
                if error.status not in _NEXT_DECODE:
                    raise
                refusals.append(error)
        status = "UNAVAILABLE" if all(e.status == "UNAVAILABLE" for e in refusals) else "RESOURCE_EXHAUSTED"
        if not refusals:
            raise Unavailable("no decode instance is serving now; try again shortly")
        raise Upstream(status, "no decode instance can take this request now ("
                       + "; ".join(str(e) for e in refusals) + ")")

    def _prefill(self, address: str, decode_address: str, handle: str, started: float) -> int:
        with (self.router.prefilling(address, self._prompt_len()),
              child_span("prefill.call", self.trace_parent, kind=SpanKind.CLIENT) as span):
            sent = time.monotonic()
            call = self.tiers.prefill(address, self.spec.prompt_ids + self._sent, self.spec.sampling, decode_address,
                                      handle, self._context(span), first_step=len(self._sent))
            result = self._track(call).result()
            span.set_attributes({"pdserve.prefill.queue_ms": result.queue_ms,
                                 "pdserve.prefill.compute_ms": result.compute_ms,
                                 "pdserve.kv.transfer_tail_ms": result.kv_transfer_ms,
                                 "pdserve.kv.bytes": result.kv_bytes, "pdserve.prefill.chunks": result.num_chunks})
        self.timings = PhaseTimings(queue_ms=(sent - started) * 1000 + result.queue_ms,
                                    prefill_ms=result.compute_ms, kv_transfer_ms=result.kv_transfer_ms)
        return result.first_token

    def _decode(self, address: str, handle: str, first: int) -> Iterator[DecodeChunk]:
        first_step = len(self._sent) - 1  # `first` is already among the sent tokens
        args = DecodeArgs(handle, first, self.spec.max_new_tokens - first_step, self.spec.sampling,
                          self.eos_token_ids, self.spec.stop, self.spec.prompt_ids + self._sent[:-1],
                          self.spec.speculative, first_step)
        with child_span("decode.call", self.trace_parent, kind=SpanKind.CLIENT) as span:
            yield from self._track(self.tiers.decode(address, args, self._context(span)))

    def _prompt_len(self) -> int:
        """Tokens this leg prefills: the prompt and every token sent before."""
        return len(self.spec.prompt_ids) + len(self._sent)

    def _context(self, span: Span) -> CallContext:
        remaining = None if self.deadline is None else max(self.deadline - time.monotonic(), 0.0)
        return CallContext(self.spec.request_id, span, remaining)

    def _track(self, call):
        with self._lock:
            self._calls.append(call)
            cancelled = self._cancelled
        if cancelled:
            call.cancel()
        return call
