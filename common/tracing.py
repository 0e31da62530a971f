"""W3C trace context across tiers: each process has an OpenTelemetry tracer; spans are parented to the
caller's span through the `traceparent` / `tracestate` gRPC metadata."""

import grpc
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider


def init_tracing(service_name: str) -> None:
    """Installs an SDK tracer provider (spans get real ids; exporters are configured separately)."""
    if not isinstance(trace.get_tracer_provider(), TracerProvider):
        trace.set_tracer_provider(TracerProvider(resource=Resource.create({"service.name": service_name})))


def tracer(name: str) -> trace.Tracer:
    return trace.get_tracer(name)


def incoming_context(context: grpc.ServicerContext) -> otel_context.Context:
    """The caller's trace context, read from the RPC's metadata."""
    carrier = {item.key: item.value for item in context.invocation_metadata() or ()}
    return propagate.extract(carrier)


def outgoing_metadata(request_id: str) -> list[tuple[str, str]]:
    """Metadata for a downstream call: the request id and the current span's trace context."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return [("x-request-id", request_id), *carrier.items()]
