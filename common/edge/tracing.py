"""W3C trace context across tiers: each process has an OpenTelemetry tracer; spans are parented to the
caller's span through the `traceparent` / `tracestate` gRPC metadata.

Spans are exported over OTLP/gRPC only when main() found an endpoint (OTEL_EXPORTER_OTLP_ENDPOINT or
OTEL_EXPORTER_OTLP_TRACES_ENDPOINT); the exporter and sampler read the other standard OTEL_* variables
themselves. Without an endpoint the SDK provider still gives spans real ids, so a caller's trace context
keeps flowing downstream.
"""

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager

import grpc
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace import Span, SpanKind, Status, StatusCode


def init_tracing(service_name: str, *, export: bool = False) -> TracerProvider | None:
    """Installs an SDK tracer provider; with export, spans go to the OTLP endpoint of the OTEL_* variables.
    OTEL_SERVICE_NAME, when set, wins over `service_name`. Returns the provider this call installed."""
    if isinstance(trace.get_tracer_provider(), TracerProvider):
        return None
    resource = Resource.create({"process.pid": os.getpid()})
    if resource.attributes.get(SERVICE_NAME, "unknown_service").startswith("unknown_service"):
        resource = resource.merge(Resource({SERVICE_NAME: service_name}))
    provider = TracerProvider(resource=resource)
    if export:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (
            OTLPSpanExporter,
        )

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(provider)
    return provider


def tracer(name: str) -> trace.Tracer:
    return trace.get_tracer(name)


def incoming_context(context: grpc.ServicerContext) -> otel_context.Context:
    """The caller's trace context, read from the RPC's metadata."""
    carrier = {item.key: item.value for item in context.invocation_metadata() or ()}
    return propagate.extract(carrier)


def outgoing_metadata(request_id: str, parent: Span | None = None) -> list[tuple[str, str]]:
    """Metadata for a downstream call: the request id and the trace context of `parent` (default: the
    current span)."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier, context=trace.set_span_in_context(parent) if parent is not None else None)
    return [("x-request-id", request_id), *carrier.items()]


@contextmanager
def child_span(name: str, parent: Span, *, kind: SpanKind = SpanKind.INTERNAL,
               tracer_name: str = "pdserve") -> Iterator[Span]:
    """A span under `parent` that is not made current: safe around `yield` in a generator, whose body may
    be resumed, closed or collected on another thread or context."""
    span = tracer(tracer_name).start_span(name, context=trace.set_span_in_context(parent), kind=kind)
    try:
        yield span
    except GeneratorExit:
        raise  # the consumer stopped early (e.g. after the last token): not an error
    except BaseException as error:
        span.set_status(Status(StatusCode.ERROR, f"{type(error).__name__}: {error}"))
        raise
    finally:
        span.end()


class WallClock:
    """Converts time.monotonic() readings (what the engines record) to the Unix nanoseconds of span
    timestamps, so a phase measured by an engine can become a span after the fact."""

    def __init__(self, num_reads: int = 5) -> None:
        self._offset_ns = wall_minus_monotonic_ns(num_reads)

    def ns(self, monotonic_s: float) -> int:
        return int(monotonic_s * 1e9) + self._offset_ns


def wall_minus_monotonic_ns(num_reads: int = 5) -> int:
    """time.time_ns() - time.monotonic_ns() at one instant. Each try reads the wall clock between two
    monotonic reads and takes their midpoint, so its error is at most half the gap between them; the
    tightest of num_reads tries wins. (One plain pair of reads is off by whatever ran between them, a
    thread switch included, which could put a converted phase before the live span that contains it.)"""
    best_gap_ns, best_offset_ns = None, 0
    for _ in range(num_reads):
        before = time.monotonic_ns()
        wall = time.time_ns()
        after = time.monotonic_ns()
        if best_gap_ns is None or after - before < best_gap_ns:
            best_gap_ns, best_offset_ns = after - before, wall - (before + after) // 2
    return best_offset_ns


def record_phase(name: str, parent: Span, start_s: float, end_s: float, clock: WallClock,
                 attributes: dict | None = None, tracer_name: str = "pdserve") -> None:
    """A finished span under `parent` for a phase timed in monotonic seconds, [start_s, end_s]."""
    span = tracer(tracer_name).start_span(name, context=trace.set_span_in_context(parent),
                                          start_time=clock.ns(start_s), attributes=attributes)
    span.end(end_time=clock.ns(max(end_s, start_s)))
