"""Traces and metrics of the real stack: `pdserve up` exports spans over OTLP/gRPC to a receiver running in
this test process and serves Prometheus metrics on ports the test chose; requests go through the gateway,
then the test reads back one trace per request and each tier's histograms."""

import json
import math
import os
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import grpc
import pytest
import torch
from helpers import request
from otlp_receiver import OtlpReceiver, ReceivedSpan
from prometheus_client.parser import text_string_to_metric_families
from stack import STACK_BLOCK_SIZE, STACK_CHUNK_SIZE, launch_stack, stop_stack
from stack_probes import free_port_run, tier_pids

from pdserve.v1 import gateway_pb2_grpc

LONG_PROMPT = ("The history of computing is a story of abstractions: from relays to vacuum tubes, from transistors "
               "to integrated circuits, and from assembly language to compilers that let people say what they mean.")
PROMPTS = [LONG_PROMPT, "The capital of France is", "Write one word:", "Once upon a time"]
MAX_NEW_TOKENS = 6
CLIENT_TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_SPAN_ID = "00f067aa0ba902b7"
TIERS = ("gateway", "prefill", "decode")
# OpenTelemetry GenAI semantic conventions, written out here rather than imported from the code under test.
GENAI_BUCKETS = {
    "gen_ai_server_time_to_first_token_seconds":
        [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0],
    "gen_ai_server_time_per_output_token_seconds":
        [0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5],
    "gen_ai_server_request_duration_seconds":
        [0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92],
}


@dataclass
class Traffic:
    receiver: OtlpReceiver
    metrics: dict[str, str]  # tier -> host:port
    pids: dict[str, int]  # tier -> process id
    replies: list  # the last GenerateResponse of each request, in PROMPTS order
    output: list[str]  # lines `pdserve up` printed so far


def generate(address: str, prompt: str, metadata: tuple = ()):
    with grpc.insecure_channel(address) as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)
        return list(stub.Generate(request(prompt, max_new_tokens=MAX_NEW_TOKENS), timeout=300, metadata=metadata))[-1]


@pytest.fixture(scope="module")
def traffic(model_dir):
    receiver = OtlpReceiver().start()
    base = free_port_run("127.0.0.1", 3)
    env = {**os.environ, "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint, "OTEL_BSP_SCHEDULE_DELAY": "100"}
    env.pop("OTEL_SERVICE_NAME", None)
    process, addresses = launch_stack(model_dir, "--metrics-port", str(base), env=env)
    output = process.output  # drained all along by launch_stack: the banner can be read while it runs
    try:
        client_parent = (("traceparent", f"00-{CLIENT_TRACE_ID}-{CLIENT_SPAN_ID}-01"),)
        with ThreadPoolExecutor(len(PROMPTS)) as pool:
            futures = [pool.submit(generate, addresses["gateway"], prompt, client_parent if i == 1 else ())
                       for i, prompt in enumerate(PROMPTS)]
            replies = [f.result() for f in futures]
        pids = tier_pids(process.pid)
        metrics = {tier: f"127.0.0.1:{base + i}" for i, tier in enumerate(TIERS)}
        yield Traffic(receiver, metrics, pids, replies, output)
    finally:
        stop_stack(process)
        receiver.stop()


def request_spans(spans: list[ReceivedSpan]) -> list[ReceivedSpan]:
    return [s for s in spans if s.attributes.get("pdserve.phase") == "request"]


def complete_traces(spans: list[ReceivedSpan]) -> bool:
    """Every request's trace has arrived whole (its last spans, the request's and decode's, included)."""
    roots = request_spans(spans)
    decodes = [s for s in spans if s.name == "decode"]
    return len(roots) >= len(PROMPTS) and len(decodes) >= sum(1 for s in roots
                                                             if s.attributes["gen_ai.usage.output_tokens"] > 1)


@pytest.fixture(scope="module")
def spans(traffic) -> list[ReceivedSpan]:
    return traffic.receiver.wait_for(complete_traces, timeout_s=30)


def kv_bytes_per_token(model_dir) -> int:
    config = json.loads((model_dir / "config.json").read_text())
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    # K and V, float32, every layer.
    return 2 * 4 * config["num_hidden_layers"] * config["num_key_value_heads"] * head_dim


def only(spans: list[ReceivedSpan], name: str) -> ReceivedSpan:
    found = [s for s in spans if s.name == name]
    assert len(found) == 1, f"expected one {name} span, found {len(found)}: {[s.name for s in spans]}"
    return found[0]


def test_one_trace_per_request_across_the_three_processes(traffic, spans):
    roots = request_spans(spans)
    assert len(roots) == len(PROMPTS)
    assert len({r.trace_id for r in roots}) == len(PROMPTS)
    by_id = {r.attributes["gen_ai.response.id"]: r for r in roots}
    assert set(by_id) == {reply.request_id for reply in traffic.replies}
    for reply in traffic.replies:
        trace = [s for s in spans if s.trace_id == by_id[reply.request_id].trace_id]
        assert {s.pid for s in trace} == set(traffic.pids.values())
        for s in trace:
            assert s.service == f"pdserve-{_tier_of(traffic, s)}"


def _tier_of(traffic: Traffic, span: ReceivedSpan) -> str:
    return next(tier for tier, pid in traffic.pids.items() if pid == span.pid)


def test_client_trace_context_continues_through_the_gateway(spans):
    root = next(s for s in request_spans(spans) if s.trace_id == CLIENT_TRACE_ID)
    assert root.parent_id == CLIENT_SPAN_ID
    others = [s for s in request_spans(spans) if s is not root]
    assert all(s.parent_id == "" for s in others)


@pytest.mark.parametrize("index", range(len(PROMPTS)))
def test_spans_are_parented_phase_by_phase(traffic, spans, model_dir, index):
    reply = traffic.replies[index]
    root = next(s for s in request_spans(spans) if s.attributes["gen_ai.response.id"] == reply.request_id)
    trace = [s for s in spans if s.trace_id == root.trace_id]
    pid = traffic.pids

    def child(name: str, parent: ReceivedSpan, tier: str) -> ReceivedSpan:
        found = only([s for s in trace if s.parent_id == parent.span_id], name)
        assert found.pid == pid[tier], f"{name} came from the wrong process"
        return found

    decoded = reply.usage.completion_tokens > 1  # a first token that ends the request skips the decode leg
    for name in ("tokenize", "route", "prefill.call", *(["decode.call"] if decoded else [])):
        child(name, root, "gateway")
    child("decode.reserve", child("route", root, "gateway"), "decode")
    prefill = child("prefill", child("prefill.call", root, "gateway"), "prefill")
    child("prefill.queue", prefill, "prefill")
    transfer = child("kv.transfer", prefill, "prefill")
    receive = child("kv.receive", transfer, "decode")

    num_prompt = reply.usage.prompt_tokens
    chunks = sorted((s for s in trace if s.name == "prefill.compute"), key=lambda s: s.start_ns)
    assert len(chunks) == math.ceil(num_prompt / STACK_CHUNK_SIZE)
    assert all(c.parent_id == prefill.span_id and c.pid == pid["prefill"] for c in chunks)
    assert all(a.end_ns <= b.start_ns for a, b in zip(chunks, chunks[1:]))
    assert prefill.start_ns <= chunks[0].start_ns and chunks[-1].end_ns <= prefill.end_ns

    expected_bytes = num_prompt * kv_bytes_per_token(model_dir)
    assert transfer.attributes["pdserve.kv.bytes"] == expected_bytes == receive.attributes["pdserve.kv.bytes"]
    assert transfer.attributes["pdserve.kv.pages"] == len(chunks) * json.loads(
        (model_dir / "config.json").read_text())["num_hidden_layers"]
    assert transfer.attributes["pdserve.kv.mb_per_s"] > 0
    assert transfer.start_ns <= receive.start_ns and receive.end_ns <= transfer.end_ns

    assert root.attributes["gen_ai.usage.input_tokens"] == num_prompt
    assert root.attributes["gen_ai.usage.output_tokens"] == reply.usage.completion_tokens
    assert root.attributes["gen_ai.response.finish_reasons"] == [
        {1: "stop", 2: "length"}[reply.finish_reason]]
    assert "gen_ai.first_token" in root.events
    if decoded:
        decode = child("decode", child("decode.call", root, "gateway"), "decode")
        child("decode.queue", decode, "decode")
        # The first token came from prefill; decode streamed the rest.
        assert decode.attributes["pdserve.decode.tokens"] == reply.usage.completion_tokens - 1


def scrape(address: str) -> dict:
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as response:
        return {family.name: family for family in text_string_to_metric_families(response.read().decode())}


def value(families: dict, family: str, sample: str, **labels) -> float:
    """The sum of `sample` over the series of `family` whose labels include `labels`."""
    assert family in families, f"no {family} in {sorted(families)}"
    return sum(s.value for s in families[family].samples
               if s.name == sample and labels.items() <= s.labels.items())


def test_gateway_serves_genai_histograms_counting_every_request(traffic):
    families = scrape(traffic.metrics["gateway"])
    replies = traffic.replies
    num_decoded = sum(r.usage.completion_tokens > 1 for r in replies)
    counts = {"gen_ai_server_time_to_first_token_seconds": len(replies),
              "gen_ai_server_request_duration_seconds": len(replies),
              "gen_ai_server_time_per_output_token_seconds": num_decoded}
    for name, expected in counts.items():
        assert value(families, name, f"{name}_count") == expected, name
        bounds = sorted(float(s.labels["le"]) for s in families[name].samples
                        if s.name == f"{name}_bucket" and s.labels["le"] != "+Inf")
        assert bounds == GENAI_BUCKETS[name]
    for reason, number in ((1, "stop"), (2, "length")):
        expected = sum(r.finish_reason == reason for r in replies)
        assert value(families, "pdserve_gateway_requests", "pdserve_gateway_requests_total",
                     finish_reason=number, code="OK") == expected
    assert value(families, "pdserve_gateway_tokens", "pdserve_gateway_tokens_total", gen_ai_token_type="output") \
        == sum(r.usage.completion_tokens for r in replies)


def test_prefill_metrics_count_every_prompt_and_kv_byte(traffic, model_dir):
    families = scrape(traffic.metrics["prefill"])
    num_prompt = sum(r.usage.prompt_tokens for r in traffic.replies)
    for name in ("pdserve_prefill_queue_seconds", "pdserve_prefill_compute_seconds", "pdserve_kv_transfer_seconds"):
        assert value(families, name, f"{name}_count") == len(traffic.replies), name
    assert value(families, "pdserve_prefill_prompt_tokens", "pdserve_prefill_prompt_tokens_total") == num_prompt
    assert value(families, "pdserve_kv_transfer_bytes", "pdserve_kv_transfer_bytes_total") \
        == num_prompt * kv_bytes_per_token(model_dir)
    assert value(families, "pdserve_prefill_queue_depth", "pdserve_prefill_queue_depth") == 0
    assert value(families, "pdserve_kv_blocks_used", "pdserve_kv_blocks_used", tier="prefill") == 0
    _assert_prefix_cache_metrics(families, traffic.replies, "prefill")


def _assert_prefix_cache_metrics(families: dict, replies, tier: str) -> None:
    """Every prompt was looked up in the tier's prefix cache; the prompts share no full block, so none hit, and
    their full blocks stay cached after them."""
    queried = sum(r.usage.prompt_tokens for r in replies)
    assert value(families, "pdserve_prefix_cache_query_tokens", "pdserve_prefix_cache_query_tokens_total",
                 tier=tier) == queried
    assert value(families, "pdserve_prefix_cache_hit_tokens", "pdserve_prefix_cache_hit_tokens_total",
                 tier=tier) == 0
    assert value(families, "pdserve_prefix_cache_hit_rate", "pdserve_prefix_cache_hit_rate", tier=tier) == 0
    assert value(families, "pdserve_prefix_cache_blocks", "pdserve_prefix_cache_blocks", tier=tier) \
        >= sum(r.usage.prompt_tokens // STACK_BLOCK_SIZE for r in replies)


def test_decode_metrics_count_every_decoded_request(traffic, model_dir):
    families = scrape(traffic.metrics["decode"])
    decoded = [r for r in traffic.replies if r.usage.completion_tokens > 1]
    for name in ("pdserve_decode_queue_seconds", "pdserve_decode_tokens_per_step"):
        assert value(families, name, f"{name}_count") == len(decoded), name
    # Without speculation every step adds exactly one token per sequence.
    assert value(families, "pdserve_decode_tokens_per_step", "pdserve_decode_tokens_per_step_sum") == len(decoded)
    assert value(families, "pdserve_decode_tokens", "pdserve_decode_tokens_total") \
        == sum(r.usage.completion_tokens - 1 for r in decoded)
    assert value(families, "pdserve_kv_received_bytes", "pdserve_kv_received_bytes_total") \
        == sum(r.usage.prompt_tokens for r in traffic.replies) * kv_bytes_per_token(model_dir)
    assert value(families, "pdserve_decode_batch_size", "pdserve_decode_batch_size") == 0
    assert value(families, "pdserve_kv_blocks_used", "pdserve_kv_blocks_used", tier="decode") == 0
    _assert_prefix_cache_metrics(families, traffic.replies, "decode")
    assert value(families, "pdserve_decode_preemptions", "pdserve_decode_preemptions_total") == 0
    assert value(families, "pdserve_decode_local_prefills", "pdserve_decode_local_prefills_total") == 0


def test_gpu_metrics_appear_only_with_a_gpu(traffic):
    for tier in ("prefill", "decode"):
        gpu_series = [name for name in scrape(traffic.metrics[tier]) if name.startswith("pdserve_gpu_")]
        assert bool(gpu_series) == torch.cuda.is_available(), gpu_series


def test_up_prints_every_metrics_address(traffic):
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and not all(f"/{a}/metrics" in "".join(traffic.output)
                                                  for a in traffic.metrics.values()):
        time.sleep(0.2)
    printed = "".join(traffic.output)
    for tier, address in traffic.metrics.items():
        assert f"{tier}" in printed and f"http://{address}/metrics" in printed


def test_trace_report_breaks_down_the_exported_spans(traffic, spans, tmp_path):
    path = tmp_path / "spans.jsonl"
    traffic.receiver.write_json_lines(path)
    result = subprocess.run([sys.executable, "-m", "pdserve.cli", "trace-report", str(path)], capture_output=True,
                            text=True, timeout=60, check=True)
    rows = {line.split()[0]: line.split() for line in result.stdout.splitlines()[2:]}
    durations_ms = sorted((s.end_ns - s.start_ns) / 1e6 for s in request_spans(spans))
    request_row = rows["request"]
    assert int(request_row[2]) == len(PROMPTS)
    # Nearest rank of 4 values: p50 is the 2nd smallest, p99 the largest.
    assert float(request_row[3]) == pytest.approx(durations_ms[1], abs=0.01)
    assert float(request_row[4]) == pytest.approx(durations_ms[-1], abs=0.01)
    assert int(rows["prefill.compute"][2]) == sum(s.name == "prefill.compute" for s in spans)
    assert {"tokenize", "route", "prefill", "kv.transfer", "kv.receive", "decode"} <= set(rows)
