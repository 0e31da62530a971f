"""`pdserve bench` on the extractive workload against the test stack, which speculates by prompt lookup
(tests/conftest.py): the responses report speculation that was accepted, and what the harness adds up
from them is what the decode tier itself counted."""

import pytest

from common.bench.workloads import WORKLOADS, make_requests
from helpers import run_bench

NUM_REQUESTS = 5  # one of each extractive kind, all at once: a handful of seconds on two cores


@pytest.fixture(scope="module")
def extractive_run(stack, tmp_path_factory):
    return run_bench(stack, tmp_path_factory.mktemp("bench-spec"), "--name", "spec-stack", "--workload", "extractive",
                     "--num-requests", str(NUM_REQUESTS), "--concurrency", str(NUM_REQUESTS), "--max-duration-s", "90",
                     "--no-roofline")


def test_every_extractive_request_completes_as_text(extractive_run):
    code, _, summary, records, _, _ = extractive_run
    assert code == 0
    run = summary["runs"][0]
    assert run["workload"] == "extractive" and run["num_completed"] == NUM_REQUESTS
    sent = {r.index: r for r in make_requests(WORKLOADS["extractive"], NUM_REQUESTS, 0)}
    assert {r["kind"] for r in records} == {r.kind for r in sent.values()}
    for record in records:
        assert record["num_tokens"] == record["completion_tokens"] >= 2
        # the server's prompt length for the text sent: at least a token per word, plus the chat template
        assert record["prompt_tokens"] > len(sent[record["index"]].text.split())


def test_speculation_is_reported_and_accepted(extractive_run):
    _, out, summary, records, _, _ = extractive_run
    spec = summary["runs"][0]["speculation"]
    assert spec["num_requests"] >= 1 and spec["acceptance_rate"] > 0
    assert spec["tokens_per_verify_step"]["mean"] > 1.0
    for r in (r for r in records if r["speculated"]):
        assert 0 <= r["spec_accepted"] <= r["spec_proposed"]
        assert r["spec_acceptance_rate"] == pytest.approx(r["spec_accepted"] / r["spec_proposed"])
        assert 1.0 <= r["spec_tokens_per_verify_step"] <= 1 + 16
    row = next(line for line in (out / "report.md").read_text().splitlines() if line.startswith("| spec-stack |"))
    assert f"| {spec['acceptance_rate']:.2f} | {spec['tokens_per_verify_step']['mean']:.2f} |" in row


def test_speculation_figures_add_up_to_the_decode_tiers_own_counts(extractive_run):
    _, _, summary, records, before, after = extractive_run
    spec = summary["runs"][0]["speculation"]
    assert spec["num_proposed"] == sum(r["spec_proposed"] for r in records)
    assert spec["num_proposed"] == after.num_spec_proposed - before.num_spec_proposed
    assert spec["num_accepted"] == after.num_spec_accepted - before.num_spec_accepted
    assert after.num_tokens_generated - before.num_tokens_generated == sum(r["num_tokens"] - 1 for r in records)
    # a step that accepts drafts makes more tokens than it runs sequences
    batch = summary["runs"][0]["decode_batch"]
    assert batch["tokens_per_step"] > batch["mean_per_step"] >= 1.0
