"""How one Decode stream is recorded: the `decode` span (tokens, steps, tokens per step: the speculative
acceptance this sequence saw) with a `decode.queue` child for the wait for its KV and a batch slot, and
the tier's metrics. Everything is read from the Sequence and the events the engine already produces.

The span is not made current: the servicer is a generator that gRPC may abandon on a client cancel."""

import time

from opentelemetry import context as otel_context
from opentelemetry.trace import SpanKind, Status, StatusCode

from common.edge.metrics import DecodeMetrics
from common.edge.tracing import WallClock, record_phase, tracer
from decode_svc.engine import DecodeEvent, Sequence

_TRACER = "pdserve.decode"


class DecodeObserver:
    def __init__(self, metrics: DecodeMetrics, parent: otel_context.Context, request_id: str) -> None:
        self.metrics = metrics
        self.span = tracer(_TRACER).start_span("decode", context=parent, kind=SpanKind.SERVER,
                                               attributes={"pdserve.request_id": request_id})
        self.num_steps = 0  # events that carried tokens: one per engine step this sequence took part in
        self.num_tokens = 0
        self._seq: Sequence | None = None
        self._admitted = False

    def started(self, seq: Sequence) -> None:
        self._seq = seq
        self.metrics.waiting.inc()

    def event(self, event: DecodeEvent) -> None:
        if not self._admitted:
            self._admission()
        if event.token_ids:
            self.num_steps += 1
            self.num_tokens += len(event.token_ids)
        if event.finish_reason:
            self.metrics.requests.labels(event.finish_reason).inc()
            self.span.set_attribute("gen_ai.response.finish_reasons", [event.finish_reason])
            if self.num_steps:
                self.metrics.tokens_per_step.observe(self.num_tokens / self.num_steps)
            self._speculation(getattr(event, "spec", None))

    def error(self, message: str) -> None:
        self.span.set_status(Status(StatusCode.ERROR, message))

    def end(self) -> None:
        if self._seq is not None and not self._admitted:
            self._admission()
        self.span.set_attributes({"pdserve.decode.tokens": self.num_tokens, "pdserve.decode.steps": self.num_steps,
                                  "pdserve.decode.tokens_per_step": self.num_tokens / max(self.num_steps, 1)})
        self.span.end()

    def _speculation(self, spec) -> None:
        """The last event of a sequence that speculated carries its draft counters."""
        if spec is None or not spec.num_proposed:
            return
        self.span.set_attributes({"pdserve.spec.proposed": spec.num_proposed,
                                  "pdserve.spec.accepted": spec.num_accepted,
                                  "pdserve.spec.acceptance": spec.num_accepted / spec.num_proposed})

    def _admission(self) -> None:
        """The first event (or the end) means the sequence left the waiting queue."""
        self._admitted = True
        self.metrics.waiting.dec()
        seq = self._seq
        left_at = seq.admitted_at if seq.admitted_at is not None else time.monotonic()
        record_phase("decode.queue", self.span, seq.arrived_at, left_at, WallClock(), tracer_name=_TRACER,
                     attributes={"pdserve.decode.admitted": seq.admitted_at is not None})
        if seq.admitted_at is not None:
            self.metrics.queue_time.observe(seq.admitted_at - seq.arrived_at)
