"""Deployment acceptance, what an operator runs on a GPU host: builds the image with the Docker SDK, brings
compose.yaml with compose.gpu.yaml and the observability profile up, waits for every container through the SDK, then sends requests through the published
gateway and checks the whole path: tokens come back, Jaeger holds one trace per request across the three
tiers, Prometheus counts the requests, Grafana serves the dashboard, and `pdserve trace-report` reads the
collector's trace file. Tears everything down (volumes included) at the end.

    .venv/bin/pytest tests/deploy -q -rs

It needs a Docker engine with the compose plugin and the NVIDIA container toolkit, the wheels (`make
docker-wheels`), and the host ports 50051, 16686, 9090 and 3000 free. Where any of these is missing (as on CI)
every test skips with that reason. The CPU file is run for real by `make test-deploy` (test_compose_run.py).
"""

import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
import urllib.parse
import urllib.request
import uuid
from collections import Counter
from pathlib import Path

import docker
import grpc
import pytest
import yaml
from compose_runner import docker_engine
from helpers import request

from pdserve.trace_report.report import read_spans
from pdserve.v1 import gateway_pb2_grpc

ROOT = Path(__file__).resolve().parents[2]
PROJECT = f"pdserve-accept-{uuid.uuid4().hex[:8]}"
GATEWAY = "127.0.0.1:50051"
JAEGER = "http://127.0.0.1:16686"
PROMETHEUS = "http://127.0.0.1:9090"
GRAFANA = "http://127.0.0.1:3000"
TIERS = ("gateway", "prefill", "decode")
OBSERVABILITY = ("otel-collector", "jaeger", "prometheus", "grafana")
START_TIMEOUT_S = 1800  # image pulls and model preparation on a fresh host
NUM_REQUESTS = 3


@pytest.fixture(scope="module")
def engine():
    client, missing = docker_engine(timeout_s=10)
    if client is None:
        pytest.skip(missing)
    if shutil.which("docker") is None or subprocess.run(["docker", "compose", "version"],
                                                          capture_output=True).returncode != 0:
        pytest.skip("a Docker engine answers, but the docker CLI's compose plugin is not installed")
    if "nvidia" not in client.info().get("Runtimes", {}):
        pytest.skip("the Docker engine has no NVIDIA runtime (container toolkit): compose.gpu.yaml needs a GPU host")
    yield client
    client.close()


def compose(*args: str, timeout_s: float) -> subprocess.CompletedProcess:
    """The GPU file over compose.yaml, with the observability profile and the tiers' spans sent to its collector."""
    files = ["-f", str(ROOT / "compose.yaml"), "-f", str(ROOT / "compose.gpu.yaml")]
    environ = {**os.environ, "PDSERVE_OTLP_ENDPOINT": "http://otel-collector:4317"}
    return subprocess.run(["docker", "compose", *files, "--profile", "observability", "-p", PROJECT, *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=timeout_s, env=environ)


def containers(client) -> dict:
    """Compose service name -> container of this project."""
    found = client.containers.list(all=True, filters={"label": f"com.docker.compose.project={PROJECT}"})
    return {c.labels["com.docker.compose.service"]: c for c in found}


def wait_ready(client) -> None:
    """Until model-init has exited 0, the tiers are healthy and the observability services run."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        found = containers(client)
        for c in found.values():
            c.reload()
        init = found.get("model-init")
        if init is not None and init.status == "exited" and init.attrs["State"]["ExitCode"] != 0:
            pytest.fail(f"model-init failed:\n{init.logs(tail=50).decode()}")
        healthy = all(name in found and found[name].attrs["State"].get("Health", {}).get("Status") == "healthy"
                      for name in TIERS)
        if healthy and all(name in found and found[name].status == "running" for name in OBSERVABILITY):
            return
        time.sleep(5)
    logs = {name: c.logs(tail=20).decode() for name, c in containers(client).items()}
    pytest.fail(f"the deployment was not ready after {START_TIMEOUT_S} s: {json.dumps(logs, indent=1)}")


@pytest.fixture(scope="module")
def deployment(engine):
    gpu_base = yaml.safe_load((ROOT / "compose.gpu.yaml").read_text())["services"]["decode"]["build"]["args"]
    image, _ = engine.images.build(path=str(ROOT), tag=f"{PROJECT}:accept", rm=True, buildargs=gpu_base)
    try:
        up = compose("up", "--detach", "--build", timeout_s=START_TIMEOUT_S)
        assert up.returncode == 0, f"docker compose up failed:\n{up.stderr[-4000:]}"
        wait_ready(engine)
        yield engine
    finally:
        compose("down", "--volumes", "--remove-orphans", timeout_s=600)
        engine.images.remove(image.id, force=True)


def get_json(url: str, **params) -> dict:
    query = f"?{urllib.parse.urlencode(params)}" if params else ""
    with urllib.request.urlopen(url + query, timeout=30) as response:
        return json.loads(response.read())


def prometheus_value(query: str) -> float:
    result = get_json(f"{PROMETHEUS}/api/v1/query", query=query)["data"]["result"]
    return float(result[0]["value"][1]) if result else 0.0


@pytest.fixture(scope="module")
def api_key(deployment) -> str:
    """The first API key, printed once (alone on its line) by the secrets-init service."""
    logs = containers(deployment)["secrets-init"].logs().decode()
    keys = re.findall(r"^(pdk_[A-Za-z0-9_-]+)$", logs, flags=re.MULTILINE)
    assert len(keys) == 1, "secrets-init printed no API key"
    return keys[0]


@pytest.fixture(scope="module")
def traffic(deployment, api_key):
    ttft_count = "sum(gen_ai_server_time_to_first_token_seconds_count)"
    before = prometheus_value(ttft_count)
    request_ids = [f"accept-{uuid.uuid4().hex[:12]}" for _ in range(NUM_REQUESTS)]
    replies = []
    with grpc.insecure_channel(GATEWAY) as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)
        for request_id in request_ids:
            stream = stub.Generate(request("The capital of France is", max_new_tokens=8), timeout=300,
                                   metadata=(("x-request-id", request_id), ("authorization", f"Bearer {api_key}")))
            replies.append(list(stream))
    return request_ids, replies, before


def test_the_gateway_refuses_a_caller_without_a_key(deployment):
    with grpc.insecure_channel(GATEWAY) as channel, pytest.raises(grpc.RpcError) as raised:
        list(gateway_pb2_grpc.GatewayStub(channel).Generate(request("Hi", max_new_tokens=2), timeout=60))
    assert raised.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_every_service_is_up(deployment):
    found = containers(deployment)
    assert found["model-init"].attrs["State"]["ExitCode"] == 0
    assert all(found[name].attrs["State"]["Health"]["Status"] == "healthy" for name in TIERS)


def test_gateway_generates_end_to_end(traffic):
    _, replies, _ = traffic
    for messages in replies:
        assert messages[-1].finish_reason and sum(len(m.token_ids) for m in messages) >= 1
        assert "".join(m.text for m in messages).strip()


def jaeger_trace(request_id: str) -> dict:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        traces = get_json(f"{JAEGER}/api/traces", service="pdserve-gateway", lookback="1h", limit=5,
                          tags=json.dumps({"gen_ai.response.id": request_id}))["data"]
        if traces and len(traces[0]["processes"]) == len(TIERS) and any(s["operationName"] == "decode"
                                                                          for s in traces[0]["spans"]):
            assert len(traces) == 1, f"{len(traces)} traces for one request"
            return traces[0]
        time.sleep(2)
    pytest.fail(f"Jaeger has no complete trace for {request_id}")


def test_jaeger_holds_one_trace_per_request_across_the_tiers(traffic):
    request_ids, _, _ = traffic
    for request_id in request_ids:
        trace = jaeger_trace(request_id)
        services = {p["serviceName"] for p in trace["processes"].values()}
        assert services == {f"pdserve-{tier}" for tier in TIERS}
        spans = {s["spanID"]: s for s in trace["spans"]}

        def parent_of(name: str) -> str:
            span = next(s for s in spans.values() if s["operationName"] == name)
            parents = [r["spanID"] for r in span["references"] if r["refType"] == "CHILD_OF"]
            return spans[parents[0]]["operationName"]

        assert parent_of("kv.receive") == "kv.transfer"
        assert parent_of("kv.transfer") == "prefill"
        assert parent_of("prefill") == "prefill.call"
        assert parent_of("decode") == "decode.call"


def test_prometheus_counts_every_request(traffic):
    _, _, before = traffic
    query = "sum(gen_ai_server_time_to_first_token_seconds_count)"
    deadline = time.monotonic() + 60  # a few scrape intervals
    while prometheus_value(query) - before < NUM_REQUESTS and time.monotonic() < deadline:
        time.sleep(2)
    assert prometheus_value(query) - before == NUM_REQUESTS
    targets = get_json(f"{PROMETHEUS}/api/v1/targets")["data"]["activeTargets"]
    assert {t["labels"]["job"]: t["health"] for t in targets} == dict.fromkeys(TIERS, "up")


def test_grafana_serves_the_provisioned_dashboard(deployment):
    dashboard = get_json(f"{GRAFANA}/api/dashboards/uid/pdserve-tiers")["dashboard"]
    assert dashboard["title"] == "pdserve tiers" and len(dashboard["panels"]) >= 6


REPORTED_PHASES = {"prefill.compute", "kv.transfer", "kv.receive", "decode.queue"}
FLUSH_TIMEOUT_S = 60  # the collector's batch processor flushes every few seconds


def collector_phases(client, into: Path) -> Counter:
    """Spans per phase in the collector's trace file so far, copied to `into`: none while the file is not
    there yet, or ends in a line still being written."""
    try:
        chunks, _ = containers(client)["otel-collector"].get_archive("/traces/spans.jsonl")
        with tarfile.open(fileobj=io.BytesIO(b"".join(chunks))) as archive:
            archive.extractall(into, filter="data")
        return Counter(s.phase for s in read_spans((into / "spans.jsonl").read_text().splitlines()))
    except (docker.errors.NotFound, ValueError):
        return Counter()


def test_trace_report_reads_the_collector_file(deployment, traffic, tmp_path):
    deadline = time.monotonic() + FLUSH_TIMEOUT_S
    while (phases := collector_phases(deployment, tmp_path))["request"] < NUM_REQUESTS \
            or not REPORTED_PHASES <= set(phases):
        assert time.monotonic() < deadline, f"after {FLUSH_TIMEOUT_S} s the collector's file holds {dict(phases)}"
        time.sleep(1)
    result = subprocess.run([sys.executable, "-m", "pdserve.cli", "trace-report", str(tmp_path / "spans.jsonl")],
                            capture_output=True, text=True, timeout=120, check=True)
    rows = {line.split()[0]: line.split() for line in result.stdout.splitlines()[2:]}
    assert int(rows["request"][2]) >= NUM_REQUESTS
    assert REPORTED_PHASES <= set(rows)
