"""The pure pieces of telemetry: NVML gauges (against a fake NVML), engine stats as metrics, when spans are
exported, metrics ports of `pdserve up`, the trace report's arithmetic, and the monotonic-to-wall conversion
of spans recorded after the fact."""

import json
import time
from argparse import Namespace
from types import SimpleNamespace

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from common.edge.gpu_metrics import GpuCollector
from common.edge.metrics import DECODE_STATS, StatsCollector
from common.edge.telemetry import TelemetryConfig, exports_traces
from common.edge.tracing import WallClock
from pdserve.launcher import metrics_flags
from pdserve.trace_report.report import format_report, percentile, read_spans


class FakeNvmlError(Exception):
    pass


def fake_nvml(gpus: list[tuple[int, int, int]], init_error: bool = False) -> SimpleNamespace:
    """An NVML stand-in: one (utilization %, used bytes, total bytes) per GPU."""
    def init():
        if init_error:
            raise FakeNvmlError("NVML Shared Library Not Found")
    return SimpleNamespace(
        NVMLError=FakeNvmlError, nvmlInit=init, nvmlDeviceGetCount=lambda: len(gpus),
        nvmlDeviceGetHandleByIndex=lambda i: i,
        nvmlDeviceGetUtilizationRates=lambda h: SimpleNamespace(gpu=gpus[h][0], memory=0),
        nvmlDeviceGetMemoryInfo=lambda h: SimpleNamespace(used=gpus[h][1], total=gpus[h][2], free=0),
    )


def exposition(collector) -> str:
    registry = CollectorRegistry()
    registry.register(collector)
    return generate_latest(registry).decode()


def test_gpu_collector_reports_each_gpu():
    text = exposition(GpuCollector.try_create(fake_nvml([(37, 2 * 2**30, 80 * 2**30), (0, 0, 40 * 2**30)])))
    samples = {(s.name, s.labels["gpu"]): s.value for f in text_string_to_metric_families(text) for s in f.samples}
    assert samples == {
        ("pdserve_gpu_utilization_ratio", "0"): 0.37, ("pdserve_gpu_utilization_ratio", "1"): 0.0,
        ("pdserve_gpu_memory_used_bytes", "0"): 2 * 2**30, ("pdserve_gpu_memory_used_bytes", "1"): 0,
        ("pdserve_gpu_memory_total_bytes", "0"): 80 * 2**30, ("pdserve_gpu_memory_total_bytes", "1"): 40 * 2**30,
    }


@pytest.mark.parametrize("nvml", [fake_nvml([], init_error=True), fake_nvml([])])
def test_no_gpu_means_no_collector(nvml):
    assert GpuCollector.try_create(nvml) is None


def test_real_nvml_is_absent_cleanly_on_a_cpu_machine():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert GpuCollector.try_create() is None


def test_stats_collector_exports_snapshot_fields_and_blocks_used():
    snapshot = SimpleNamespace(num_running=3, num_reserved=1, num_steps=10, num_tokens_generated=25,
                               num_blocks_free=60, num_blocks_total=100, unrelated=7)
    text = exposition(StatsCollector(lambda: snapshot, DECODE_STATS, tier="decode"))
    assert 'pdserve_decode_batch_size{tier="decode"} 3.0' in text
    assert 'pdserve_decode_tokens_total{tier="decode"} 25.0' in text
    assert 'pdserve_kv_blocks_used{tier="decode"} 40.0' in text
    assert "unrelated" not in text and "leases_expired" not in text  # absent fields are not invented


@pytest.mark.parametrize("environ, expected", [
    ({}, False),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4317"}, True),
    ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://collector:4317"}, True),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4317", "OTEL_SDK_DISABLED": "true"}, False),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4317", "OTEL_TRACES_EXPORTER": "none"}, False),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "  "}, False),
])
def test_spans_are_exported_only_when_an_endpoint_is_set(environ, expected):
    assert exports_traces(environ) is expected


def test_telemetry_config_rejects_a_bad_port():
    with pytest.raises(ValueError, match="metrics port"):
        TelemetryConfig(service_name="pdserve-gateway", metrics_port=70000)


@pytest.mark.parametrize("base, tier, expected", [
    (9400, "gateway", ["--metrics-port", "9400"]), (9400, "prefill", ["--metrics-port", "9401"]),
    (19000, "decode", ["--metrics-port", "19002"]), (0, "decode", ["--metrics-port", "0"]),
    (9400, "colocated", []), (9400, "decode-1", ["--metrics-port", "9405"]), (9400, "prefill-2", ["--metrics-port", "9407"]),
])
def test_up_moves_every_metrics_port_with_the_base(base, tier, expected):
    assert metrics_flags(Namespace(metrics_port=base), tier) == expected


def test_percentile_is_nearest_rank():
    values = [float(v) for v in range(1, 101)]  # 1..100
    assert percentile(values, 50) == 50.0
    assert percentile(values, 99) == 99.0
    assert percentile([5.0, 1.0, 3.0], 50) == 3.0
    assert percentile([7.0], 99) == 7.0


def otlp_line(service: str, spans: list[tuple[str, str, str, str, int, int]]) -> str:
    """One ExportTraceServiceRequest in OTLP JSON; spans as (trace, span, parent, name, start_ns, end_ns)."""
    return json.dumps({"resourceSpans": [{
        "resource": {"attributes": [{"key": "service.name", "value": {"stringValue": service}}]},
        "scopeSpans": [{"spans": [
            {"traceId": t, "spanId": s, "parentSpanId": p, "name": n, "startTimeUnixNano": str(a),
             "endTimeUnixNano": str(b),
             "attributes": [{"key": "pdserve.phase", "value": {"stringValue": "request"}}] if not p else []}
            for t, s, p, n, a, b in spans]}]}]})


def test_report_gives_each_phase_in_request_order():
    ms = 1_000_000
    lines = [
        otlp_line("pdserve-gateway", [("t1", "a", "", "chat m", 0, 100 * ms), ("t2", "b", "", "chat m", 0, 300 * ms)]),
        otlp_line("pdserve-decode", [("t1", "c", "a", "decode", 40 * ms, 90 * ms),
                                     ("t2", "d", "b", "decode", 60 * ms, 260 * ms)]),
        "",
    ]
    report = format_report(list(read_spans(lines))).splitlines()
    assert report[0].startswith("2 traces, 4 spans")
    request, decode = (line.split() for line in report[2:])
    assert request[:3] == ["request", "pdserve-gateway", "2"]
    assert [float(v) for v in request[3:]] == [100.0, 300.0, 200.0, 0.0]
    assert decode[:3] == ["decode", "pdserve-decode", "2"]
    assert [float(v) for v in decode[3:]] == [50.0, 200.0, 125.0, 50.0]


def test_report_names_a_line_that_is_not_json():
    with pytest.raises(ValueError, match="line 2"):
        list(read_spans(['{"resourceSpans": []}', "not json"]))


def test_wall_clock_puts_a_monotonic_reading_between_the_wall_reads_around_it():
    clock = WallClock()
    # The offset's error is half the tightest bracket of its reads: tens of nanoseconds unless every try was
    # preempted; a microsecond covers that, and a unit or sign slip is off by far more.
    slack_ns = 1_000
    for _ in range(100):
        wall_before = time.time_ns()
        converted = clock.ns(time.monotonic())
        wall_after = time.time_ns()
        assert wall_before - slack_ns <= converted <= wall_after + slack_ns
