"""The accuracy-drop gate on synthetic outcomes, the (weights, KV dtype) configurations `pdserve eval` runs, and
how greedy prompts are grouped into batches that fit the scorer's KV pool."""

import pytest

from common.fidelity.harness import ConfigResult, Gate, configurations
from common.fidelity.scoring import batches
from common.fidelity.stats import accuracy, paired_difference

REFERENCE_OUTCOMES = [True] * 200 + [False] * 160


def _result(config: dict[str, list[bool]]) -> ConfigResult:
    result = ConfigResult(weights="int8", weight_bytes=1, perplexity=10.0, ppl_increase=0.0, top1_agreement=1.0,
                          mean_kl=0.0, accuracy={}, seconds=1.0)
    for suite, right in config.items():
        result.outcomes[suite] = right
        result.accuracy_interval[suite] = accuracy(right)
        result.accuracy[suite] = result.accuracy_interval[suite].estimate
        result.difference[suite] = paired_difference(right, REFERENCE_OUTCOMES)
    return result


def _losing(num_lost: int, num_gained: int = 0) -> list[bool]:
    """The reference's outcomes with num_lost of its right answers wrong and num_gained wrong ones right."""
    return [False] * num_lost + [True] * (200 - num_lost) + [True] * num_gained + [False] * (160 - num_gained)


def test_a_significant_drop_fails_and_the_message_names_suite_drop_and_interval():
    result = _result({"gen-dates": _losing(30), "gen-code": _losing(2)})
    failures = Gate(max_accuracy_drop=0.0).failures(result)
    assert len(failures) == 1
    assert failures[0].startswith("gen-dates accuracy -8.3 points against the reference (95% interval -")
    assert "30 items lost, 0 gained" in failures[0]


def test_a_drop_inside_its_interval_or_within_the_allowance_passes():
    assert Gate(max_accuracy_drop=0.0).failures(_result({"gen-code": _losing(3)})) == []
    assert Gate(max_accuracy_drop=0.0).failures(_result({"gen-code": _losing(12, num_gained=10)})) == []
    assert Gate(max_accuracy_drop=0.0).failures(_result({"gen-code": REFERENCE_OUTCOMES})) == []
    # 30 lost of 360: -8.3 points, 95% interval -11.2 to -5.4: surely beyond 5 points, not surely beyond 6.
    assert Gate(max_accuracy_drop=0.06).failures(_result({"gen-dates": _losing(30)})) == []
    assert Gate(max_accuracy_drop=0.05).failures(_result({"gen-dates": _losing(30)})) != []


def test_gains_never_fail_and_no_gate_no_failure():
    assert Gate(max_accuracy_drop=0.0).failures(_result({"gen-code": _losing(0, num_gained=40)})) == []
    assert Gate().failures(_result({"gen-dates": _losing(100)})) == []


def test_an_accuracy_drop_gate_with_no_task_suite_run_fails_instead_of_passing():
    assert Gate(max_accuracy_drop=0.0).failures(_result({})) == [
        "no task suite was run, so accuracy drops cannot be gated: run a task suite too"]


def test_configurations_cross_weights_with_kv_dtypes_after_the_reference():
    assert configurations(["int8"], ["float32"]) == [("fp32", "float32"), ("int8", "float32")]
    assert configurations(["fp32"], ["int8", "fp8"]) == [("fp32", "float32"), ("fp32", "int8"), ("fp32", "fp8")]
    assert configurations(["int8", "fp32"], ["float32", "int8"]) == [
        ("fp32", "float32"), ("fp32", "int8"), ("int8", "float32"), ("int8", "int8")]
    assert configurations(["fp32"], ["float32"]) == [("fp32", "float32")]


def test_greedy_batches_are_consecutive_and_fit_the_pool():
    assert batches([3, 3, 3, 2, 5], capacity=6, max_batch=64) == [[0, 1], [2, 3], [4]]
    assert batches([1] * 5, capacity=100, max_batch=2) == [[0, 1], [2, 3], [4]]
    assert batches([], capacity=6, max_batch=2) == []
    with pytest.raises(ValueError, match="raise max_tokens"):
        batches([7], capacity=6, max_batch=2)
