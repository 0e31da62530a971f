"""`pdserve bench` on the extractive workload against a stack that speculates by prompt lookup at a fixed k:
the responses report speculation that was accepted, and what the harness adds up from them is what the
decode tier itself counted.

A fixed k makes the proposals a function of the text alone. With the adaptive k (the shared test stack's)
how much a sequence proposes follows the verify-step costs the decode tier measures at start-up, so on a
machine where verification looks dear it may propose nothing at all."""

import pytest
from helpers import run_bench
from stack import running_stack

from pdserve.bench.workloads import WORKLOADS, make_requests

NUM_REQUESTS = 5  # one of each extractive kind, all at once: a handful of seconds on two cores
NUM_SPECULATIVE_TOKENS = 4  # the fixed k


@pytest.fixture(scope="module")
def fixed_k_stack(model_dir):
    with running_stack(model_dir, "--speculative", "prompt-lookup", "--speculative-fixed-k",
                       "--num-speculative-tokens", str(NUM_SPECULATIVE_TOKENS)) as stack:
        yield stack


@pytest.fixture(scope="module")
def extractive_run(fixed_k_stack, tmp_path_factory):
    return run_bench(fixed_k_stack, tmp_path_factory.mktemp("bench-spec"), "--name", "spec-stack", "--workload",
                     "extractive", "--num-requests", str(NUM_REQUESTS), "--concurrency", str(NUM_REQUESTS),
                     "--max-duration-s", "90", "--no-roofline")


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
    # At a fixed k a sequence proposes at every step whose last tokens occur earlier in its context, and every
    # extractive answer repeats words of the passage in its prompt: every request speculated, and drafts
    # copied from the passage were accepted.
    assert spec["num_requests"] == NUM_REQUESTS and all(r["speculated"] for r in records)
    assert spec["num_accepted"] > 0 and spec["tokens_per_verify_step"]["mean"] > 1.0
    for r in records:
        assert 0 < r["spec_proposed"] and 0 <= r["spec_accepted"] <= r["spec_proposed"]
        assert r["spec_acceptance_rate"] == pytest.approx(r["spec_accepted"] / r["spec_proposed"])
        assert 1.0 <= r["spec_tokens_per_verify_step"] <= 1 + NUM_SPECULATIVE_TOKENS  # at most k drafts a step
    row = next(line for line in (out / "report.md").read_text().splitlines() if line.startswith("| spec-stack |"))
    assert f"| {spec['acceptance_rate']:.2f} | {spec['tokens_per_verify_step']['mean']:.2f} |" in row


def test_speculation_figures_add_up_to_the_decode_tiers_own_counts(extractive_run):
    _, _, summary, records, before, after = extractive_run
    spec = summary["runs"][0]["speculation"]
    assert spec["num_proposed"] == sum(r["spec_proposed"] for r in records)
    assert spec["num_proposed"] == after.num_spec_proposed - before.num_spec_proposed
    assert spec["num_accepted"] == after.num_spec_accepted - before.num_spec_accepted
    decoded = after.num_tokens_generated - before.num_tokens_generated
    assert decoded == sum(r["num_tokens"] - 1 for r in records)
    # Each sequence a step runs gains one token plus the drafts it accepted (fewer only when a stop token
    # among them ends it): the tokens past one per sequence stepped are accepted drafts, and there are some.
    stepped = round(after.mean_batch_size * after.num_steps - before.mean_batch_size * before.num_steps)
    assert 0 < decoded - stepped <= spec["num_accepted"]
    # the harness's sampled window of the same counters: never fewer tokens than sequences stepped
    batch = summary["runs"][0]["decode_batch"]
    assert batch["tokens_per_step"] >= batch["mean_per_step"] >= 1.0
