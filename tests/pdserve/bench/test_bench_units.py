"""The harness's pure pieces: workloads, arrivals, metrics, CPU lists, the report (no servers, no weights)."""

import json
import os
import statistics

import pytest
import torch
from safetensors.torch import save_file

from pdserve.affinity import parse_cpus
from pdserve.bench import report
from pdserve.bench.cli import PEER_NAMES, WORKLOAD_NAMES
from pdserve.bench.loadgen import RequestResult
from pdserve.bench.metrics import Slo, decode_batch, kv_transfer, summarize
from pdserve.bench.peers import PEERS
from pdserve.bench.roofline import count_parameters
from pdserve.bench.workloads import WORKLOADS, make_requests, poisson_offsets_s


def test_cli_names_match_the_registries():
    assert set(WORKLOAD_NAMES) == set(WORKLOADS)
    assert set(PEER_NAMES) == set(PEERS)


def test_requests_are_reproducible_from_the_seed_and_differ_across_seeds():
    mixed = WORKLOADS["mixed"]
    assert make_requests(mixed, 20, seed=7) == make_requests(mixed, 20, seed=7)
    assert make_requests(mixed, 20, seed=7) != make_requests(mixed, 20, seed=8)


def test_mixed_workload_holds_long_prompts_among_short_chat_turns_at_its_share():
    requests = make_requests(WORKLOADS["mixed"], 40, seed=0)
    long = [r for r in requests if r.kind == "long"]
    chat = [r for r in requests if r.kind == "chat"]
    assert len(long) == 8 and len(chat) == 32
    assert all(768 <= len(r.prompt_ids) <= 1024 and 16 <= r.max_new_tokens <= 48 for r in long)
    assert all(32 <= len(r.prompt_ids) <= 128 and 32 <= r.max_new_tokens <= 96 for r in chat)
    assert [r.index for r in requests] == list(range(40))
    first_long = min(r.index for r in long)
    assert any(r.kind == "chat" for r in requests[first_long:])  # interleaved, not all long at the end
    assert all(1_000 <= t < 40_000 for r in requests for t in r.prompt_ids)


def test_a_short_mixed_run_still_has_a_long_prompt():
    assert {r.kind for r in make_requests(WORKLOADS["mixed"], 3, seed=1)} == {"chat", "long"}


def test_poisson_arrivals_have_the_requested_mean_rate():
    offsets = poisson_offsets_s(4000, rate_rps=2.0, seed=3)
    gaps = [b - a for a, b in zip(offsets, offsets[1:])]
    assert offsets[0] == 0.0 and all(g >= 0 for g in gaps)
    assert statistics.mean(gaps) == pytest.approx(0.5, rel=0.05)
    assert statistics.stdev(gaps) == pytest.approx(0.5, rel=0.1)  # exponential: stdev equals the mean


def _result(index, times, kind="chat", prompt=10, prefill_ms=0.0, kv_ms=0.0, error=""):
    return RequestResult(index, kind, prompt, 8, sent_s=0.0, token_times_s=list(times), error=error,
                         prefill_ms=prefill_ms, kv_transfer_ms=kv_ms)


def test_summary_metrics_from_known_token_times():
    results = [
        _result(0, [0.1, 0.2, 0.3, 0.4, 0.5]),  # TTFT 100 ms, TPOT 100 ms, e2e 500 ms
        _result(1, [0.3, 0.35, 0.4], kind="long"),  # TTFT 300 ms, TPOT 50 ms, e2e 400 ms
        _result(2, [], error="DEADLINE_EXCEEDED"),
    ]
    s = summarize(results, duration_s=2.0, slo=Slo(ttft_ms=200, tpot_ms=200))
    assert (s["num_completed"], s["num_failed"], s["errors"]) == (2, 1, ["DEADLINE_EXCEEDED"])
    assert s["output_tokens"] == 8 and s["output_tokens_per_s"] == 4.0
    assert s["ttft_ms"]["p50"] == pytest.approx(200.0) and s["ttft_ms"]["p99"] == pytest.approx(298.0)
    assert s["tpot_ms"]["p50"] == pytest.approx(75.0)
    assert s["e2e_ms"]["p90"] == pytest.approx(490.0)
    assert s["goodput_rps"] == 0.5  # only request 0 meets TTFT <= 200 ms
    assert s["by_kind"]["long"]["ttft_ms"]["p50"] == pytest.approx(300.0)


def test_goodput_needs_both_objectives():
    results = [_result(0, [0.05, 0.55]), _result(1, [0.05, 0.1])]  # TPOT 500 ms and 50 ms
    assert summarize(results, 1.0, Slo(ttft_ms=100, tpot_ms=100))["goodput_rps"] == 1.0


def test_decode_batch_mean_is_sequences_per_step_and_tokens_per_step_is_apart():
    # (seconds, running, steps, tokens, sequences stepped): 20 steps over 50 sequences made 80 tokens
    samples = [(0.0, 0, 10, 10, 10.0), (0.5, 3, 20, 50, 35.0), (1.0, 2, 30, 90, 60.0)]
    batch = decode_batch(samples)
    assert batch["mean_per_step"] == 2.5 and batch["tokens_per_step"] == 4.0
    assert batch["max_running"] == 3 and batch["num_steps"] == 20 and batch["tokens_generated"] == 80


def test_kv_transfer_counts_every_prompt_token_over_the_push_window():
    results = [_result(0, [0.1], prompt=100, prefill_ms=150, kv_ms=50), _result(1, [0.1], prompt=300, prefill_ms=700,
                                                                                   kv_ms=100)]
    kv = kv_transfer(results, kv_bytes_per_token=1000)
    assert kv["bytes"] == 400_000 and kv["mb_per_s"] == pytest.approx(0.4 / 1.0)
    assert kv_transfer(results, None) is None


def test_cpu_lists_parse_and_refuse_what_is_not_there():
    first = min(os.sched_getaffinity(0))
    assert parse_cpus(str(first)) == {first}
    assert parse_cpus(f"{first}-{first}") == {first}
    for bad in ("", "a", "1-0", "0-x", str(max(os.sched_getaffinity(0)) + 1000)):
        with pytest.raises(ValueError):
            parse_cpus(bad)


def test_parameters_are_counted_from_the_safetensors_header(tmp_path):
    save_file({"a": torch.zeros(3, 4), "b": torch.zeros(5)}, tmp_path / "model.safetensors")
    assert count_parameters(tmp_path) == 17


def test_markdown_report_has_a_row_per_run_and_the_roofline(tmp_path):
    run = {"name": "peer-a", "workload": "mixed", "load": "poisson 1 req/s",
           **summarize([_result(0, [0.1, 0.2])], 1.0, Slo(1000, 1000)), "decode_batch": None, "kv_transfer": None}
    roof = {"num_parameters": 1e6, "weight_bytes": 4e6,
            "machine": [{"threads": 1, "memory_bandwidth_gbs": 10.0, "matmul_gflops": 100.0, "batch1_step_floor_ms": 0.4,
                         "saturated_tokens_per_s_ceiling": 50000.0}],
            "batch1": [{"name": "peer-a", "threads": 1, "step_ms": 0.8, "floor_ms": 0.4}], "saturated": []}
    summary = {"created": "now", "git_commit": "abc", "machine": "Some CPU (2 cores usable)",
               "slo": {"ttft_ms": 1000, "tpot_ms": 1000},
               "workload": {"name": "mixed", "description": "d", "num_requests": 1, "seed": 0},
               "runs": [run], "peers": [], "skipped": [{"name": "llama.cpp", "reason": "absent"}], "roofline": roof}
    text = report.write_markdown(tmp_path, summary).read_text()
    assert "| peer-a | mixed | poisson 1 req/s | 1/1 |" in text
    assert "2.0x the floor" in text and "llama.cpp skipped: absent" in text
    assert "Machine: Some CPU (2 cores usable)" in text
    assert json.loads(report.write_summary(tmp_path, summary).read_text())["runs"][0]["name"] == "peer-a"


def test_each_batch1_floor_counts_the_bytes_its_peer_serves(model_dir):
    from pdserve.bench.peer_process import PeerOptions
    from pdserve.bench.peers import weights_of
    from pdserve.bench.roofline import served_weight_bytes
    from pdserve.bench.runner import _engine_threads
    from pdserve.prepare.default_model import default_gguf_path

    options = PeerOptions(model_dir=model_dir, log_dir=model_dir, prefill_cpus=frozenset({0}),
                          decode_cpus=frozenset({1}), weights="fp32")
    assert {n: weights_of(n, options) for n in ("hf-static", "pdserve", "pdserve-fp16", "llama.cpp")} == {
        "hf-static": "fp32", "pdserve": "fp32", "pdserve-fp16": "fp16", "llama.cpp": "gguf"}
    assert _engine_threads("pdserve-fp16", options) == 1 and _engine_threads("pdserve-colocated", options) == 2
    fp32, fp16 = served_weight_bytes(model_dir, "fp32"), served_weight_bytes(model_dir, "fp16")
    assert fp32 == count_parameters(model_dir) * 4
    assert 0.5 < fp16 / fp32 < 0.501  # projections and embedding halve; the norms stay fp32
    assert served_weight_bytes(model_dir, "gguf") == default_gguf_path().stat().st_size
