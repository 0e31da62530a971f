"""Static checks of the observability half of compose.yaml (its `observability` profile, with
PDSERVE_OTLP_ENDPOINT set as the file's header says; the suite runs no Docker engine): the tiers export spans to
the collector, the collector forwards them to Jaeger and a file, Prometheus scrapes every
tier's metrics port, and the Grafana dashboard queries only series the tiers really export."""

import json
import re
from pathlib import Path, PurePosixPath
from types import SimpleNamespace

import pytest
import yaml
from compose_file import COMPOSE_PATH, ROOT, TIERS, load_compose, parse_command
from prometheus_client import CollectorRegistry

from common.edge.gpu_metrics import GpuCollector
from common.edge.metrics import (
    DECODE_STATS,
    PREFILL_STATS,
    DecodeMetrics,
    GatewayMetrics,
    PrefillMetrics,
    StatsCollector,
)
from common.edge.telemetry import exports_traces

OBSERVABILITY = ("otel-collector", "jaeger", "prometheus", "grafana")
UI_PORTS = {"jaeger": 16686, "prometheus": 9090, "grafana": 3000}
OBSERVED = {"PDSERVE_OTLP_ENDPOINT": "http://otel-collector:4317"}


@pytest.fixture(scope="module")
def services() -> dict:
    return load_compose(COMPOSE_PATH, environ=OBSERVED, profiles=("observability",))["services"]


def mounts(service: dict) -> dict[PurePosixPath, str]:
    """Container path -> source of each short-syntax volume."""
    return {PurePosixPath(v.split(":")[1]): v.split(":")[0] for v in service.get("volumes", [])}


def mounted_file(service: dict, container_path: str) -> Path:
    source = mounts(service)[PurePosixPath(container_path)]
    assert source.startswith("./"), f"{container_path} is not mounted from the repository"
    return ROOT / source


def collector_config(services: dict) -> dict:
    command = services["otel-collector"]["command"]
    config_path = next(arg.split("=", 1)[1] for arg in command if arg.startswith("--config="))
    return yaml.safe_load(mounted_file(services["otel-collector"], config_path).read_text())


def test_without_the_profile_no_observability_service_starts_and_no_span_leaves():
    # A CPU host with no registry runs compose.yaml as it is: the four images are never pulled, and the tiers
    # get an empty endpoint, which exports nothing (rather than retrying a collector that is not there).
    plain = load_compose(COMPOSE_PATH, environ={})["services"]
    assert not set(OBSERVABILITY) & set(plain)
    for name in TIERS:
        assert not exports_traces(plain[name]["environment"])


def test_observability_services_are_declared(services):
    assert set(OBSERVABILITY) <= set(services)


@pytest.mark.parametrize("name", TIERS)
def test_tier_exports_spans_to_the_collector(services, name):
    grpc_endpoint = collector_config(services)["receivers"]["otlp"]["protocols"]["grpc"]["endpoint"]
    environment = services[name]["environment"]
    assert environment["OTEL_EXPORTER_OTLP_ENDPOINT"] == f"http://otel-collector:{grpc_endpoint.rsplit(':', 1)[1]}"
    assert exports_traces(environment)


def test_collector_forwards_spans_to_jaeger_and_a_trace_file(services):
    config = collector_config(services)
    exporters = config["service"]["pipelines"]["traces"]["exporters"]
    jaeger = next(config["exporters"][e] for e in exporters if e.startswith("otlp"))
    assert jaeger["endpoint"] == "jaeger:4317"
    assert services["jaeger"]["environment"]["COLLECTOR_OTLP_ENABLED"] == "true"
    trace_file = PurePosixPath(config["exporters"]["file"]["path"])
    volumes = [target for target, source in mounts(services["otel-collector"]).items() if not source.startswith(".")]
    assert any(trace_file.is_relative_to(target) for target in volumes), "the trace file is not on a volume"


def test_prometheus_scrapes_every_tier_metrics_port(services):
    config = yaml.safe_load(mounted_file(services["prometheus"], "/etc/prometheus/prometheus.yml").read_text())
    targets = {job["job_name"]: job["static_configs"][0]["targets"] for job in config["scrape_configs"]}
    assert targets == {name: [f"{name}:{parse_command(services[name]['command']).metrics_port}"] for name in TIERS}


def test_tier_metrics_ports_are_distinct_and_on(services):
    ports = [parse_command(services[name]["command"]).metrics_port for name in TIERS]
    assert len(set(ports)) == len(TIERS) and 0 not in ports


def test_only_the_uis_publish_ports(services):
    for name in OBSERVABILITY:
        published = [str(p) for p in services[name].get("ports", [])]
        assert published == ([f"{UI_PORTS[name]}:{UI_PORTS[name]}"] if name in UI_PORTS else [])


def grafana_files(services: dict) -> tuple[dict, dict, Path]:
    """(data source provisioning, dashboard provider provisioning, dashboards folder) as mounted."""
    grafana = services["grafana"]
    provisioning = mounted_file(grafana, "/etc/grafana/provisioning")
    datasources = yaml.safe_load((provisioning / "datasources" / "prometheus.yaml").read_text())
    providers = yaml.safe_load((provisioning / "dashboards" / "pdserve.yaml").read_text())
    folder = mounted_file(grafana, providers["providers"][0]["options"]["path"])
    return datasources, providers, folder


def test_grafana_reads_prometheus_and_the_dashboard_folder(services):
    datasources, _, folder = grafana_files(services)
    source = datasources["datasources"][0]
    assert source["type"] == "prometheus" and source["url"] == f"http://prometheus:{UI_PORTS['prometheus']}"
    dashboard = json.loads((folder / "pdserve.json").read_text())
    assert {p["datasource"]["uid"] for p in dashboard["panels"]} == {source["uid"]}


def exported_series() -> set[str]:
    """Every sample name the three tiers can expose: their metrics, engine stats and GPU gauges."""
    registry = CollectorRegistry()
    for metrics in (GatewayMetrics, PrefillMetrics, DecodeMetrics):
        metrics(registry)
    for fields, tier in ((PREFILL_STATS, "prefill"), (DECODE_STATS, "decode")):
        snapshot = SimpleNamespace(**dict.fromkeys(fields, 1))
        registry.register(StatsCollector(lambda s=snapshot: s, fields, tier))
    gpu = SimpleNamespace(
        NVMLError=Exception, nvmlInit=lambda: None, nvmlDeviceGetCount=lambda: 1, nvmlDeviceGetHandleByIndex=int,
        nvmlDeviceGetUtilizationRates=lambda h: SimpleNamespace(gpu=50),
        nvmlDeviceGetMemoryInfo=lambda h: SimpleNamespace(used=1, total=2))
    registry.register(GpuCollector.try_create(gpu))
    # From each family's type: a labelled metric has no samples until a request creates its first series.
    suffixes = {"histogram": ("_bucket", "_count", "_sum"), "counter": ("_total",), "gauge": ("",)}
    return {family.name + suffix for family in registry.collect() for suffix in suffixes[family.type]}


def test_dashboard_queries_only_series_the_tiers_export(services):
    _, _, folder = grafana_files(services)
    panels = json.loads((folder / "pdserve.json").read_text())["panels"]
    selectors = [re.sub(r"\{[^}]*\}", "", t["expr"]) for p in panels for t in p["targets"]]  # drop label matchers
    queried = {name for expr in selectors for name in re.findall(r"\b(?:gen_ai|pdserve)_[a-z0-9_]+", expr)}
    assert queried and queried <= exported_series(), queried - exported_series()
    # The panels the issue names: TTFT, TPOT, throughput, KV usage, transfer, acceptance.
    assert {"gen_ai_server_time_to_first_token_seconds_bucket", "gen_ai_server_time_per_output_token_seconds_bucket",
            "pdserve_gateway_tokens_total", "pdserve_kv_blocks_used", "pdserve_kv_transfer_bytes_total",
            "pdserve_decode_tokens_per_step_sum"} <= queried
