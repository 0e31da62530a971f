"""The fidelity harness's pure pieces: suite files, exact-answer checks, the regression gate, and the
weight-format names the CLI offers against the model's registry."""

import json

import pytest

from common.basics.config import WEIGHT_FORMAT_NAMES, DecodeConfig
from common.fidelity.harness import ConfigResult, Gate
from common.fidelity.suites import TaskItem, load_suite, load_suites


def _result(**changes) -> ConfigResult:
    base = dict(weights="int8", weight_bytes=1, perplexity=10.0, ppl_increase=0.01, top1_agreement=0.95,
                mean_kl=0.01, accuracy={"arithmetic": 0.5, "code": 0.4}, seconds=1.0)
    return ConfigResult(**{**base, **changes})


def test_gate_passes_within_limits_and_names_each_regression():
    gate = Gate(max_ppl_increase=0.05, min_agreement=0.9, min_accuracy={"arithmetic": 0.4})
    assert gate.failures(_result()) == []
    failures = gate.failures(_result(ppl_increase=0.08, top1_agreement=0.8, accuracy={"arithmetic": 0.3}))
    assert len(failures) == 3
    assert "perplexity +8.0%" in failures[0] and "agreement 80.0%" in failures[1] and "arithmetic" in failures[2]


def test_gate_refuses_a_floor_for_a_suite_that_did_not_run():
    assert Gate(min_accuracy={"poetry": 0.1}).failures(_result()) == ["no task suite named 'poetry' was run"]


def test_exact_answer_checks():
    first_line = TaskItem(prompt="", answer="42")
    assert first_line.is_correct(" 42\nQ: next")
    assert not first_line.is_correct(" 420\n") and not first_line.is_correct("") and not first_line.is_correct("4 2")
    contains = TaskItem(prompt="", answer="Paris", match="contains", ignore_case=True)
    assert contains.is_correct("The capital is PARIS.") and not contains.is_correct("Lyon")
    with pytest.raises(ValueError):
        TaskItem(prompt="", answer="", match="fuzzy")


def test_regex_answers_are_searched_in_the_stripped_completion():
    begins = TaskItem(prompt="", answer=r"^\W*water\b", match="regex", ignore_case=True)
    assert begins.is_correct(' "Water" is wet.') and not begins.is_correct("The water")
    digits = TaskItem(prompt="", answer=r"\b7\b", match="regex")
    assert digits.is_correct("Seven is 7.") and not digits.is_correct("Seven is 77.")
    with pytest.raises(ValueError):
        TaskItem(prompt="", answer="(unclosed", match="regex")


def test_suite_files_hold_one_kind_of_item(tmp_path):
    (tmp_path / "ppl.jsonl").write_text(json.dumps({"text": "a b c"}) + "\n\n")
    (tmp_path / "tasks.jsonl").write_text(json.dumps({"prompt": "1+1=", "answer": "2", "max_new_tokens": 3}) + "\n")
    (tmp_path / "mixed.jsonl").write_text(json.dumps({"text": "x"}) + "\n" + json.dumps({"prompt": "p", "answer": "a"}))
    assert load_suite(tmp_path / "ppl.jsonl").is_perplexity
    assert load_suite(tmp_path / "tasks.jsonl").tasks[0].max_new_tokens == 3
    with pytest.raises(ValueError, match="not both"):
        load_suite(tmp_path / "mixed.jsonl")
    with pytest.raises(ValueError, match="no suite named nope"):
        load_suites(tmp_path, ["nope"])


def test_repository_suites_load_with_a_few_dozen_items_each():
    from common.fidelity.suites import DEFAULT_SUITES_DIR

    suites = {s.name: s for s in load_suites(DEFAULT_SUITES_DIR)}
    assert {"perplexity", "arithmetic", "multilingual", "code", "instructions"} <= suites.keys()
    assert all(len(s.tasks) >= 20 for s in suites.values() if not s.is_perplexity)


def test_cli_weight_formats_are_exactly_the_registered_ones():
    from common.model.linear import WEIGHT_FORMATS

    assert set(WEIGHT_FORMAT_NAMES) == set(WEIGHT_FORMATS) - {"dense"}
    with pytest.raises(ValueError, match="weights must be one of"):
        DecodeConfig(model_dir=".", weights="int3")


def test_gate_fails_perplexity_and_agreement_limits_that_nothing_measured():
    """With no perplexity text scored (`--only` a task suite), the figures are NaN, never a perfect score, and a
    perplexity or agreement gate fails instead of passing vacuously."""
    unmeasured = _result(perplexity=float("nan"), ppl_increase=float("nan"), top1_agreement=float("nan"),
                         mean_kl=float("nan"))
    for gate in (Gate(max_ppl_increase=0.05), Gate(min_agreement=0.9)):
        assert any("no perplexity text was scored" in f for f in gate.failures(unmeasured))
    assert Gate(min_accuracy={"arithmetic": 0.4}).failures(unmeasured) == []
