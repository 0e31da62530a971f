"""Generation: one request's legs across the tiers, as the gateway drives them.

  1. Reserve on a decode instance D (KV-aware order: the prefix it holds against its load; a full one is
     skipped): blocks + lease, and how many leading prompt tokens D's prefix cache holds already.
  2. Prefill on a prefill instance P with D's handle: P pushes the KV D lacks straight to D, returns token 1.
     Conditional disaggregation: when the part D lacks is at most local_prefill_tokens, P is skipped: D
     computes it itself and draws token 1 (prefill_path "decode-local", else "prefill-tier").
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

from common.basics.errors import PdserveError, Unavailable, Upstream
from common.basics.sampling import TokenLogprob
from common.edge.tracing import child_span
from gateway.router import Router
from gateway.tiers import (
    CallContext,
    DecodeArgs,
    DecodeChunk,
    GenerationSpec,
    Reservation,
    Tiers,
)

_NEXT_DECODE = ("RESOURCE_EXHAUSTED", "UNAVAILABLE")  # a decode instance that cannot take it: try the next
_RESUMABLE = ("UNAVAILABLE",)  # an instance failed under a leg: resume the request elsewhere
MAX_RETRIES = 3


PATH_PREFILL_TIER, PATH_DECODE_LOCAL = "prefill-tier", "decode-local"


@dataclass
class PhaseTimings:
    queue_ms: float = 0.0
    prefill_ms: float = 0.0
    kv_transfer_ms: float = 0.0
    prefill_path: str = PATH_PREFILL_TIER
    kv_bytes: int = 0  # pushed from the prefill tier to decode
    cached_tokens: int = 0  # prompt tokens whose KV was reused on the tier that prefilled


class Generation:
    def __init__(self, spec: GenerationSpec, router: Router, tiers: Tiers, *, eos_token_ids: frozenset[int],
                 lease_ms: int, deadline: float | None, trace_parent: Span, max_retries: int = MAX_RETRIES,
                 local_prefill_tokens: int = 0) -> None:
        self.spec = spec
        self.local_prefill_tokens = local_prefill_tokens  # conditional disaggregation's threshold (0: never)
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
            address, reservation = self._reserve(span, avoid)
            handle, uncached = reservation.handle, self._prompt_len() - reservation.num_cached_tokens
            local = uncached <= self.local_prefill_tokens
            try:
                prefill_address = "" if local else self.router.pick_prefill(avoid, self._prompt())
            except PdserveError:  # no prefill instance: the reservation would wait out its lease
                self.tiers.release(address, handle, self._context(span))
                raise
            span.set_attributes({"pdserve.decode.address": address, "pdserve.prefill.address": prefill_address,
                                 "pdserve.kv.handle": handle, "pdserve.resumed_after_tokens": len(self._sent),
                                 "pdserve.decode.cached_tokens": reservation.num_cached_tokens,
                                 "pdserve.prefill.path": PATH_DECODE_LOCAL if local else PATH_PREFILL_TIER})
        self._leg_addresses = (prefill_address, address) if prefill_address else (address,)
        decode_finished = False
        try:
            with self.router.decoding(address):
                if local:
                    yield from self._decode_local(address, reservation, started, resumed)
                    decode_finished = True
                    return
                first, first_logprob = self._prefill(prefill_address, address, reservation, started)
                self.num_migrations += resumed
                self._sent.append(first)
                yield DecodeChunk([first], logprobs=None if first_logprob is None else [first_logprob])
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

    def _decode_local(self, address: str, reservation: Reservation, started: float,
                      resumed: bool) -> Iterator[DecodeChunk]:
        """The decode instance prefills the prompt's uncached part itself; its first chunk is the first token."""
        sent = time.monotonic()
        args = DecodeArgs(reservation.handle, 0, self.spec.max_new_tokens - len(self._sent), self.spec.sampling,
                          self.eos_token_ids, self.spec.stop, self._prompt(), self.spec.speculative,
                          len(self._sent), prefill_locally=True)
        first = True
        with child_span("decode.call", self.trace_parent, kind=SpanKind.CLIENT) as span:
            span.set_attribute("pdserve.prefill.path", PATH_DECODE_LOCAL)
            for chunk in self._track(self.tiers.decode(address, args, self._context(span))):
                if first and chunk.token_ids:
                    first = False
                    self.num_migrations += resumed
                    self.timings = PhaseTimings((sent - started) * 1000, chunk.local_prefill_ms, 0.0,
                                                PATH_DECODE_LOCAL, 0, reservation.num_cached_tokens)
                self._sent += chunk.token_ids
                yield chunk
                if chunk.finish_reason is not None:
                    return

    def _reserve(self, span: Span, avoid: frozenset[str]) -> tuple[str, Reservation]:
        refusals = []
        for address in self.router.decode_order(avoid, self._prompt()):
            call = self.tiers.reserve(address, self._prompt(), self.spec.max_new_tokens - len(self._sent),
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

    def _prefill(self, address: str, decode_address: str, reservation: Reservation,
                 started: float) -> tuple[int, TokenLogprob | None]:
        """The first token (and its log-probabilities, when asked for), with the KV pushed to decode."""
        with (self.router.prefilling(address, self._prompt_len()),
              child_span("prefill.call", self.trace_parent, kind=SpanKind.CLIENT) as span):
            sent = time.monotonic()
            call = self.tiers.prefill(address, self._prompt(), self.spec.sampling, decode_address,
                                      reservation.handle, self._context(span), first_step=len(self._sent),
                                      kv_skip_tokens=reservation.num_cached_tokens)
            result = self._track(call).result()
            span.set_attributes({"pdserve.prefill.queue_ms": result.queue_ms,
                                 "pdserve.prefill.compute_ms": result.compute_ms,
                                 "pdserve.kv.transfer_tail_ms": result.kv_transfer_ms,
                                 "pdserve.kv.bytes": result.kv_bytes, "pdserve.prefill.chunks": result.num_chunks,
                                 "pdserve.prefill.cached_tokens": result.num_cached_tokens})
        self.timings = PhaseTimings(queue_ms=(sent - started) * 1000 + result.queue_ms,
                                    prefill_ms=result.compute_ms, kv_transfer_ms=result.kv_transfer_ms,
                                    kv_bytes=result.kv_bytes, cached_tokens=result.num_cached_tokens)
        return result.first_token, result.first_logprob

    def _decode(self, address: str, handle: str, first: int) -> Iterator[DecodeChunk]:
        first_step = len(self._sent) - 1  # `first` is already among the sent tokens
        args = DecodeArgs(handle, first, self.spec.max_new_tokens - first_step, self.spec.sampling,
                          self.eos_token_ids, self.spec.stop, self.spec.prompt_ids + self._sent[:-1],
                          self.spec.speculative, first_step)
        with child_span("decode.call", self.trace_parent, kind=SpanKind.CLIENT) as span:
            yield from self._track(self.tiers.decode(address, args, self._context(span)))

    def _prompt(self) -> list[int]:
        """What this leg prefills: the prompt and every token sent before."""
        return self.spec.prompt_ids + self._sent

    def _prompt_len(self) -> int:
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
