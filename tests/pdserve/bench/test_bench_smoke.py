"""`pdserve bench` against the test stack: a few requests, then its outputs are checked against what the
stack itself counted (decode Stats) and what the model's shape implies (KV bytes)."""

import json

import pytest
import torch
from helpers import run_bench
from stack import STACK_BLOCK_SIZE

NUM_REQUESTS = 6


@pytest.fixture(scope="module")
def bench_run(stack, tmp_path_factory):
    return run_bench(stack, tmp_path_factory.mktemp("bench"), "--name", "test-stack", "--workload", "smoke",
                     "--num-requests", str(NUM_REQUESTS), "--concurrency", "3", "--max-duration-s", "60")


def test_bench_exits_zero_and_writes_every_output(bench_run):
    code, out, summary, _, _, _ = bench_run
    assert code == 0
    for name in ("latency_cdf.png", "throughput_vs_rate.png", "decode_batch.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = (out / "report.md").read_text()
    assert "| test-stack | smoke | closed, 3 clients | 6/6 |" in report
    assert summary["machine_facts"]["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert f"Machine: {summary['machine']}" in report
    run = summary["runs"][0]
    assert set(run) >= {"name", "output_tokens_per_s", "ttft_ms", "tpot_ms", "goodput_rps"}
    for block in ("ttft_ms", "tpot_ms", "e2e_ms"):
        assert set(run[block]) >= {"p50", "p90", "p99"}


def test_tokens_counted_are_the_tokens_the_stack_generated(bench_run):
    _, _, summary, records, before, after = bench_run
    run = summary["runs"][0]
    assert run["num_completed"] == NUM_REQUESTS and len(records) == NUM_REQUESTS
    assert run["output_tokens"] == sum(r["num_tokens"] for r in records)
    for record in records:
        assert record["num_tokens"] == record["completion_tokens"]  # client count == the gateway's usage
        assert 1 <= record["num_tokens"] <= record["max_new_tokens"]
    # the prefill tier makes each request's first token; the decode tier counts every later one
    decoded = after.num_tokens_generated - before.num_tokens_generated
    assert decoded == sum(r["num_tokens"] - 1 for r in records)


def test_figures_are_consistent(bench_run):
    _, _, summary, records, _, _ = bench_run
    run = summary["runs"][0]
    for block in ("ttft_ms", "tpot_ms", "e2e_ms"):
        p = run[block]
        assert 0 < p["p50"] <= p["p90"] <= p["p99"]
    assert run["ttft_ms"]["p50"] <= run["e2e_ms"]["p50"]
    # summary.json rounds duration_s to the millisecond and the rate to 3 decimals: the rate is the tokens over
    # some duration that rounds to duration_s (for a short run, half a millisecond moves it by more than 0.1 %).
    tokens, duration_s, half_ms = run["output_tokens"], run["duration_s"], 0.0005
    assert tokens / (duration_s + half_ms) - half_ms <= run["output_tokens_per_s"] \
        <= tokens / (duration_s - half_ms) + half_ms
    assert 0 <= run["goodput_rps"] <= run["request_throughput_rps"]
    longest = max(r["sent_s"] + r["token_times_s"][-1] for r in records)
    assert run["duration_s"] >= round(longest, 3) - 0.001  # summary.json rounds seconds to milliseconds
    batch = run["decode_batch"]
    assert batch["samples"] and 1.0 <= batch["mean_per_step"] <= 3.0  # three clients at most


def test_kv_bytes_follow_the_model_shape(bench_run, model_dir):
    _, _, summary, records, _, _ = bench_run
    config = json.loads((model_dir / "config.json").read_text())
    head_dim = config["hidden_size"] // config["num_attention_heads"]
    per_token = 2 * config["num_hidden_layers"] * config["num_key_value_heads"] * head_dim * 4  # K and V, float32
    kv = summary["runs"][0]["kv_transfer"]
    if kv["measured"]:  # the gateway reports each request's bytes: whole prompt tokens, from a block boundary on
        assert kv["bytes"] == sum(r["kv_bytes"] for r in records) > 0
        for r in (r for r in records if r["prefill_path"] == "prefill-tier"):
            skipped = r["prompt_tokens"] - r["kv_bytes"] // per_token  # held by decode's prefix cache already
            assert r["kv_bytes"] % per_token == 0 and skipped in range(0, r["prompt_tokens"] + 1, STACK_BLOCK_SIZE)
    else:
        assert kv["bytes"] == per_token * sum(r["prompt_tokens"] for r in records)
    assert kv["mb_per_s"] > 0


def test_roofline_lines_are_measured(bench_run):
    _, out, summary, _, _, _ = bench_run
    machine = summary["roofline"]["machine"][0]
    assert machine["memory_bandwidth_gbs"] > 0.1 and machine["matmul_gflops"] > 0.1
    assert summary["roofline"]["weight_bytes"] == 4 * summary["roofline"]["num_parameters"]
    assert "## Roofline" in (out / "report.md").read_text()

