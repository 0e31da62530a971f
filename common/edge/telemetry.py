"""A tier process's telemetry: its tracer provider (spans exported over OTLP/gRPC when an endpoint is set)
and its Prometheus endpoint (/metrics over HTTP, plus GPU gauges on model tiers that have a GPU).
Built once in main() from flags and the standard OTEL_* variables, then passed down."""

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from wsgiref.simple_server import WSGIServer

from opentelemetry.sdk.trace import TracerProvider
from prometheus_client import CollectorRegistry, start_http_server

from common.edge.gpu_metrics import GpuCollector
from common.edge.tracing import init_tracing

# Metrics ports of `pdserve up` and the single-tier commands: base, base + 1, base + 2.
DEFAULT_METRICS_PORT = 9400
METRICS_PORT_OFFSETS = {"gateway": 0, "prefill": 1, "decode": 2}
_ENDPOINT_VARIABLES = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")
_log = logging.getLogger(__name__)


def exports_traces(environ: Mapping[str, str]) -> bool:
    """Whether the standard variables ask for spans to leave the process: an OTLP endpoint is set and
    neither the SDK nor the traces exporter is switched off."""
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    if environ.get("OTEL_TRACES_EXPORTER", "otlp").strip().lower() == "none":
        return False
    return any(environ.get(name, "").strip() for name in _ENDPOINT_VARIABLES)


@dataclass(frozen=True)
class TelemetryConfig:
    service_name: str  # the default service.name; OTEL_SERVICE_NAME wins when set
    metrics_host: str = "127.0.0.1"
    metrics_port: int = 0  # 0: no metrics endpoint
    export_traces: bool = False
    gpu_metrics: bool = False  # model tiers: NVML gauges when a GPU is present

    def __post_init__(self) -> None:
        if not 0 <= self.metrics_port <= 65535:
            raise ValueError(f"metrics port must be in [0, 65535] (0: off), got {self.metrics_port}")


@dataclass
class Telemetry:
    registry: CollectorRegistry
    metrics_host: str
    metrics_port: int  # the bound port; 0 when the endpoint is off
    _server: WSGIServer | None = None
    _provider: TracerProvider | None = None

    @property
    def metrics_address(self) -> str:
        return f"{self.metrics_host}:{self.metrics_port}"

    def stop(self) -> None:
        """Stops the metrics endpoint and flushes the spans still buffered."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._provider is not None:
            self._provider.shutdown()


def start_telemetry(config: TelemetryConfig) -> Telemetry:
    provider = init_tracing(config.service_name, export=config.export_traces)
    registry = CollectorRegistry()
    if config.gpu_metrics and (gpu := GpuCollector.try_create()) is not None:
        registry.register(gpu)
    if not config.metrics_port:
        return Telemetry(registry, config.metrics_host, 0, None, provider)
    try:
        server, _ = start_http_server(config.metrics_port, addr=config.metrics_host, registry=registry)
    except OSError as error:
        raise OSError(f"cannot serve metrics on {config.metrics_host}:{config.metrics_port} ({error}); "
                      "pass another --metrics-port, or 0 to turn metrics off") from None
    return Telemetry(registry, config.metrics_host, server.server_port, server, provider)
