"""The planner's simulator on cases whose answers follow by hand: a prefill queue, cores shared between
instances, a decode batch's steps, a unified engine's chunks; and the CLI's arrivals are the bench's."""

import json
import subprocess
import sys

import pytest

from pdserve.bench.workloads import WORKLOADS, make_requests, poisson_offsets_s
from pdserve.plan.simulate import (
    Arrival,
    Profile,
    Topology,
    percentile,
    simulate,
    summarize,
)

# prefill 100 ms whatever the prompt, a decode step 10 ms whatever the batch; no tail, no overhead
FLAT = Profile(prefill_ms=(100.0, 0.0, 0.0), step_ms=(10.0, 0.0, 0.0), transfer_tail_ms=0.0, overhead_ms=0.0)


def _close(value, expected, dt_ms=1.0, steps=3):
    """Within a few simulation ticks (the clock advances in dt_ms)."""
    assert abs(value - expected) <= steps * dt_ms, (value, expected)


def test_one_request_prefills_then_decodes_a_token_per_step():
    [out] = simulate(FLAT, Topology(1, 1, 1, 1), [Arrival(0.0, 100, 5)])
    _close(out.ttft_ms, 100)
    _close(out.tpot_ms, 10)  # four more tokens, a 10 ms step each
    assert out.tokens == 5


def test_a_prefill_queue_serves_in_turn_and_two_instances_on_one_core_share_it():
    two = [Arrival(0.0, 100, 2), Arrival(0.0, 100, 2)]
    ttfts = sorted(o.ttft_ms for o in simulate(FLAT, Topology(1, 1, 1, 1), two))
    _close(ttfts[0], 100), _close(ttfts[1], 200)  # FIFO on one instance
    shared = [o.ttft_ms for o in simulate(FLAT, Topology(2, 1, 1, 1), two)]
    _close(shared[0], 200), _close(shared[1], 200)  # two instances splitting one core: both at half speed
    apart = [o.ttft_ms for o in simulate(FLAT, Topology(2, 1, 2, 1), two)]
    _close(apart[0], 100), _close(apart[1], 100)  # each on its own core


def test_the_transfer_tail_and_overhead_add_to_ttft():
    profile = Profile((100.0, 0.0, 0.0), (10.0, 0.0, 0.0), transfer_tail_ms=5.0, overhead_ms=20.0)
    [out] = simulate(profile, Topology(1, 1, 1, 1), [Arrival(0.0, 100, 3)])
    _close(out.ttft_ms, 125)


def test_decode_steps_grow_with_batch_and_context():
    profile = Profile((1.0, 0.0, 0.0), step_ms=(5.0, 2.0, 0.01), transfer_tail_ms=0.0, overhead_ms=0.0)
    # two prefill instances on their own cores: both land together and share every step
    outs = simulate(profile, Topology(2, 1, 2, 1), [Arrival(0.0, 100, 3), Arrival(0.0, 100, 3)])
    for out in outs:  # 5 + 2 x 2 + 0.01 x (context of both, 202 then 204) = 11.03 ms per step
        _close(out.tpot_ms, 11.03, steps=1)
    [alone] = simulate(profile, Topology(1, 1, 1, 1), [Arrival(0.0, 100, 3)])
    _close(alone.tpot_ms, 5 + 2 + 0.01 * 101.5, steps=1)


def test_a_unified_engine_prefills_in_chunks_that_slow_the_running_batch():
    profile = Profile(prefill_ms=(0.0, 0.1, 0.0), step_ms=(10.0, 0.0, 0.0), transfer_tail_ms=0.0, overhead_ms=0.0)
    short, long_ = Arrival(0.0, 64, 40), Arrival(0.05, 1024, 2)
    outs = simulate(profile, Topology(0, 1, 0, 1, chunk=256), [short, long_])
    _close(outs[0].ttft_ms, 6.4)  # 64 tokens at 0.1 ms
    _close(outs[1].ttft_ms, 4 * (10 + 25.6), steps=12)  # four chunks of 256, each in a step with the batch
    assert outs[0].tpot_ms > 10 + 256 * 0.1 * 3 / 40  # the long prompt's chunks lengthened its steps


def test_percentiles_interpolate_between_ranks():
    assert percentile([1, 2, 3, 4], 50) == 2.5 and percentile([5], 99) == 5 and percentile([], 50) is None
    summary = summarize(simulate(FLAT, Topology(1, 1, 1, 1), [Arrival(0.0, 10, 1)]))
    assert summary["num_finished"] == 1 and summary["tpot_ms"]["p50"] is None


def test_cli_simulates_the_bench_workload_at_its_arrivals(tmp_path):
    profile = tmp_path / "profile.json"
    profile.write_text(json.dumps({"profile": {"prefill_ms": [20, 0.5, 0.0001], "step_ms": [30, 1.5, 0.0005],
                                               "transfer_tail_ms": 1, "overhead_ms": 5}}))
    out = tmp_path / "out.json"
    result = subprocess.run([sys.executable, "-m", "pdserve.cli", "plan", "simulate", "--profile", str(profile),
                             "--topology", "1P2D", "--rate", "0.5", "--num-requests", "12", "--json", str(out)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    summary = json.loads(out.read_text())
    assert summary["topology"] == "1P2D (1+2 cores)" and summary["num_finished"] == 12
    requests = make_requests(WORKLOADS["mixed"], 12, 0)
    arrivals = [Arrival(at, len(r.prompt_ids), r.max_new_tokens)
                for at, r in zip(poisson_offsets_s(12, 0.5, 0), sorted(requests, key=lambda r: r.index))]
    loaded = Profile((20, 0.5, 0.0001), (30, 1.5, 0.0005), 1, 5)
    assert summary["ttft_ms"] == summarize(simulate(loaded, Topology(1, 2, 1, 2), arrivals))["ttft_ms"]


@pytest.mark.parametrize("bad", ["0P1D", "P1D", "2x", "unifiedx"])
def test_cli_refuses_a_topology_it_cannot_read(bad, tmp_path):
    result = subprocess.run([sys.executable, "-m", "pdserve.cli", "plan", "simulate", "--profile", "x.json",
                             "--topology", bad, "--rate", "1"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "topology" in result.stderr


def _recommend(tmp_path, tpot_ms: str) -> dict:
    """Prefill at 400 ms a prompt (whatever its length), a cheap decode step, chat prompts at 4 req/s."""
    profile = tmp_path / "profile.json"
    profile.write_text(json.dumps({"profile": {"prefill_ms": [400, 0, 0], "step_ms": [10, 0.5, 0],
                                               "transfer_tail_ms": 0, "overhead_ms": 0}}))
    out = tmp_path / f"plan-{tpot_ms}.json"
    result = subprocess.run([sys.executable, "-m", "pdserve.cli", "plan", "recommend", "--profile", str(profile),
                             "--workload", "chat", "--rate", "4", "--num-requests", "24", "--ttft-ms", "2000",
                             "--tpot-ms", tpot_ms, "--max-instances", "4", "--json", str(out)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return json.loads(out.read_text())


def test_recommend_names_the_fewest_instances_that_meet_the_objectives(tmp_path):
    # One prefill instance cannot keep up with 400 ms prompts at 4 req/s (TTFT p99 ~3.8 s); two unified engines,
    # each prefilling its own prompts, can, at a TPOT their prompts' chunks stretch to ~90 ms.
    loose = _recommend(tmp_path, "100")
    assert loose["best"]["topology"] == "unified x2 (2 cores)" and loose["best"]["instances"] == 2
    assert not next(r for r in loose["rows"] if r["topology"].startswith("1P1D"))["meets"]
    # Under a 50 ms TPOT objective no two instances do, and of three the disaggregated 2P1D keeps TPOT lowest.
    tight = _recommend(tmp_path, "50")
    assert tight["best"]["topology"] == "2P1D (2+1 cores)" and tight["best"]["instances"] == 3


def test_a_file_that_is_no_profile_is_refused_by_name(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"profile": {"prefill_ms": [1, 2, 3]}}')
    result = subprocess.run([sys.executable, "-m", "pdserve.cli", "plan", "simulate", "--profile", str(bad),
                             "--topology", "1P1D", "--rate", "1"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and "is not a profile" in result.stderr
