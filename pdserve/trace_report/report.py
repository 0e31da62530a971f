"""`pdserve trace-report`: the per-phase latency breakdown of exported spans, for people without a
tracing backend. Reads JSON lines, each an OTLP ExportTraceServiceRequest in its JSON form (what the
OpenTelemetry Collector's file exporter writes: {"resourceSpans": [...]}). Span ids are only compared,
never decoded, so hex (OTLP JSON) and base64 (protobuf's generic JSON) both work."""

import json
import math
from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class SpanRecord:
    trace_id: str
    span_id: str
    parent_id: str
    service: str
    phase: str  # the pdserve.phase attribute when set (the request span), else the span name
    start_ns: int
    end_ns: int

    @property
    def duration_ms(self) -> float:
        return (self.end_ns - self.start_ns) / 1e6


@dataclass(frozen=True)
class PhaseRow:
    phase: str
    service: str
    count: int
    p50_ms: float
    p99_ms: float
    mean_ms: float
    offset_ms: float  # mean start after its trace's first span: orders the rows like a request's life


def percentile(values: list[float], p: float) -> float:
    """Nearest-rank percentile: the smallest value with at least p% of the values at or below it."""
    ordered = sorted(values)
    return ordered[max(math.ceil(p / 100 * len(ordered)) - 1, 0)]


def _attributes(items: list[dict]) -> dict[str, object]:
    values = {}
    for item in items or ():
        value = item.get("value", {})
        values[item["key"]] = next(iter(value.values()), None) if value else None
    return values


def read_spans(lines: Iterable[str]) -> Iterator[SpanRecord]:
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            request = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"line {number} is not JSON ({error})") from None
        for resource_spans in request.get("resourceSpans", ()):
            service = str(_attributes(resource_spans.get("resource", {}).get("attributes"))
                          .get("service.name", "unknown"))
            for scope_spans in resource_spans.get("scopeSpans", ()):
                for span in scope_spans.get("spans", ()):
                    try:
                        yield _record(span, service)
                    except KeyError as error:
                        raise ValueError(f"line {number}: a span has no {error}") from None


def _record(span: dict, service: str) -> SpanRecord:
    phase = _attributes(span.get("attributes")).get("pdserve.phase") or span["name"]
    return SpanRecord(span["traceId"], span["spanId"], span.get("parentSpanId", ""), service, str(phase),
                      int(span["startTimeUnixNano"]), int(span["endTimeUnixNano"]))


def breakdown(spans: list[SpanRecord]) -> list[PhaseRow]:
    trace_start = defaultdict(lambda: math.inf)
    for span in spans:
        trace_start[span.trace_id] = min(trace_start[span.trace_id], span.start_ns)
    groups: dict[tuple[str, str], list[SpanRecord]] = defaultdict(list)
    for span in spans:
        groups[(span.phase, span.service)].append(span)
    rows = []
    for (phase, service), members in groups.items():
        durations = [s.duration_ms for s in members]
        offsets = [(s.start_ns - trace_start[s.trace_id]) / 1e6 for s in members]
        rows.append(PhaseRow(phase, service, len(members), percentile(durations, 50), percentile(durations, 99),
                             sum(durations) / len(durations), sum(offsets) / len(offsets)))
    return sorted(rows, key=lambda row: (row.offset_ms, -row.mean_ms))


def format_report(spans: list[SpanRecord]) -> str:
    if not spans:
        return "no spans found"
    num_traces = len({s.trace_id for s in spans})
    rows = breakdown(spans)
    width = max(len(row.phase) for row in rows) + 2
    service_width = max(len(row.service) for row in rows) + 2
    lines = [f"{num_traces} traces, {len(spans)} spans; latency per phase in ms (rows in request order)",
             f"{'phase':<{width}}{'service':<{service_width}}{'count':>7}{'p50':>10}{'p99':>10}{'mean':>10}"
             f"{'starts at':>11}"]
    for row in rows:
        lines.append(f"{row.phase:<{width}}{row.service:<{service_width}}{row.count:>7}{row.p50_ms:>10.2f}"
                     f"{row.p99_ms:>10.2f}{row.mean_ms:>10.2f}{row.offset_ms:>11.2f}")
    return "\n".join(lines)


def report_files(paths: list[Path]) -> str:
    spans: list[SpanRecord] = []
    for path in paths:
        with path.open() as lines:
            spans.extend(read_spans(lines))
    return format_report(spans)
