"""A real OTLP/gRPC trace receiver for tests: the collector's TraceService, implemented with grpc and the
opentelemetry-proto package's generated stubs, keeping what it receives in memory."""

import json
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from google.protobuf import json_format
from opentelemetry.proto.collector.trace.v1 import (
    trace_service_pb2,
    trace_service_pb2_grpc,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue


@dataclass(frozen=True)
class ReceivedSpan:
    trace_id: str
    span_id: str
    parent_id: str  # "" for a root
    name: str
    kind: int  # opentelemetry.proto.trace.v1.Span.SpanKind
    service: str
    pid: int
    start_ns: int
    end_ns: int
    attributes: dict = field(hash=False)
    events: tuple[str, ...] = ()


def _value(value: AnyValue):
    kind = value.WhichOneof("value")
    if kind == "array_value":
        return [_value(v) for v in value.array_value.values]
    return getattr(value, kind) if kind else None


class OtlpReceiver(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self) -> None:
        self.requests: list[trace_service_pb2.ExportTraceServiceRequest] = []
        self._lock = threading.Lock()
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(self, self._server)
        self.port = self._server.add_insecure_port("127.0.0.1:0")

    def Export(self, request, context):
        with self._lock:
            self.requests.append(request)
        return trace_service_pb2.ExportTraceServiceResponse()

    def start(self) -> "OtlpReceiver":
        self._server.start()
        return self

    def stop(self) -> None:
        self._server.stop(0).wait()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def spans(self) -> list[ReceivedSpan]:
        with self._lock:
            requests = list(self.requests)
        found = []
        for request in requests:
            for resource_spans in request.resource_spans:
                resource = {a.key: _value(a.value) for a in resource_spans.resource.attributes}
                for scope_spans in resource_spans.scope_spans:
                    for span in scope_spans.spans:
                        found.append(ReceivedSpan(
                            span.trace_id.hex(), span.span_id.hex(), span.parent_span_id.hex(), span.name,
                            span.kind, resource.get("service.name", ""), int(resource.get("process.pid", 0)),
                            span.start_time_unix_nano, span.end_time_unix_nano,
                            {a.key: _value(a.value) for a in span.attributes}, tuple(e.name for e in span.events)))
        return found

    def wait_for(self, done: Callable[[list[ReceivedSpan]], bool], timeout_s: float) -> list[ReceivedSpan]:
        """The spans received once `done` holds. Fails when it still does not after timeout_s, naming what
        did arrive, so a late or missing span fails here and not as a puzzling count in a later assert."""
        deadline = time.monotonic() + timeout_s
        while not done(spans := self.spans()):
            if time.monotonic() >= deadline:
                arrived = Counter(s.name for s in spans)
                raise AssertionError(f"{done.__name__} still false after {timeout_s:g} s; {len(spans)} spans "
                                     f"arrived: {dict(sorted(arrived.items()))}")
            time.sleep(0.2)
        return spans

    def write_json_lines(self, path: Path) -> None:
        """One ExportTraceServiceRequest per line, in protobuf's JSON form."""
        with self._lock:
            lines = [json.dumps(json_format.MessageToDict(r)) for r in self.requests]
        path.write_text("\n".join(lines) + "\n")
