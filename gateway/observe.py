"""RequestObserver: one Generate request's trace span and metrics, so the servicer only reports what
happened (tokenized, first token, finished, failed) and this module decides how it is recorded.

The request span is never made current: the servicer is a generator that gRPC may abandon on a client
cancel, and every child span names its parent explicitly (common.edge.tracing.child_span)."""

import time

import grpc
from opentelemetry import context as otel_context
from opentelemetry.trace import SpanKind, Status, StatusCode

from common.edge.metrics import GatewayMetrics
from common.edge.tracing import tracer
from gateway.tiers import GenerationSpec

GEN_AI_PROVIDER = "pdserve"


class RequestObserver:
    def __init__(self, metrics: GatewayMetrics, *, operation: str, model: str,
                 parent: otel_context.Context) -> None:
        self.metrics = metrics
        self.arrived = time.monotonic()
        self.first_at: float | None = None
        self.num_output_tokens = 0
        self._labels = {"gen_ai_operation_name": operation, "gen_ai_request_model": model}
        self._finished = False
        self.span = tracer("pdserve.gateway").start_span(
            f"{operation} {model}", context=parent, kind=SpanKind.SERVER,
            attributes={"gen_ai.operation.name": operation, "gen_ai.provider.name": GEN_AI_PROVIDER,
                        "gen_ai.request.model": model, "rpc.system": "grpc",
                        "rpc.method": "pdserve.v1.Gateway/Generate", "pdserve.phase": "request"})
        metrics.in_flight.inc()

    def tokenized(self, spec: GenerationSpec) -> None:
        self.span.set_attributes({
            "gen_ai.response.id": spec.request_id, "pdserve.request_id": spec.request_id,
            "gen_ai.usage.input_tokens": len(spec.prompt_ids), "gen_ai.request.max_tokens": spec.max_new_tokens,
            "gen_ai.request.temperature": spec.sampling.temperature, "gen_ai.request.top_p": spec.sampling.top_p,
            "gen_ai.request.top_k": spec.sampling.top_k, "gen_ai.request.seed": spec.sampling.seed,
        })
        self.metrics.tokens.labels("input").inc(len(spec.prompt_ids))

    def tokens(self, num_tokens: int) -> None:
        """Tokens about to be streamed to the client; the first ones mark time to first token."""
        if num_tokens and self.first_at is None:
            self.first_at = time.monotonic()
            ttft_s = self.first_at - self.arrived
            self.span.add_event("gen_ai.first_token", {"gen_ai.server.time_to_first_token": ttft_s})
            self.metrics.time_to_first_token.labels(**self._labels).observe(ttft_s)
        self.num_output_tokens += num_tokens
        self.metrics.tokens.labels("output").inc(num_tokens)

    def finished(self, reason: str) -> None:
        """Called before the last response is sent, so a scrape after the client's last message sees it."""
        now = time.monotonic()
        self.span.set_attributes({"gen_ai.usage.output_tokens": self.num_output_tokens,
                                  "gen_ai.response.finish_reasons": [reason]})
        if self.first_at is not None and self.num_output_tokens > 1:
            self.metrics.time_per_output_token.labels(**self._labels).observe(
                (now - self.first_at) / (self.num_output_tokens - 1))
        self._close(grpc.StatusCode.OK, reason, now)

    def failed(self, code: grpc.StatusCode, message: str) -> None:
        self.span.set_status(Status(StatusCode.ERROR, message))
        self.span.set_attribute("error.type", code.name)
        self._close(code, "none", time.monotonic())

    def end(self) -> None:
        """Ends the span; a request that neither finished nor failed was abandoned by its client."""
        if not self._finished:
            self.failed(grpc.StatusCode.CANCELLED, "the client went away")
        self.span.end()

    def _close(self, code: grpc.StatusCode, reason: str, now: float) -> None:
        if self._finished:
            return
        self._finished = True
        self.span.set_attribute("rpc.grpc.status_code", code.value[0])
        self.metrics.request_duration.labels(**self._labels).observe(now - self.arrived)
        self.metrics.requests.labels(reason, code.name).inc()
        self.metrics.in_flight.dec()
