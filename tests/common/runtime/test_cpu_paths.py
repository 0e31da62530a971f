"""`--cpu-weight-layout auto`: a tier times its products plainly and through the CPU copies at its own row
counts, keeps the faster layout, and keeps the choice per machine so a later start of the same kind reuses it."""

import json

import pytest
import torch

from common.model.weights import load_model
from common.runtime import cpu_paths


@pytest.fixture
def cache_home(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    return tmp_path


def test_measures_both_layouts_and_leaves_the_model_as_it_was(model_dir):
    model = load_model(model_dir, "fp32")
    x = torch.randn(4, model.config.hidden_size)
    before = model.lm_head(x)
    choice = cpu_paths.measure_layouts(model, (1, 4))
    assert choice.layout in ("dual", "single") and choice.rows == (1, 4)
    assert all(ms > 0 for ms in choice.single_ms + choice.dual_ms)
    assert choice.layout == ("dual" if sum(choice.dual_ms) < sum(choice.single_ms) else "single")
    # the copies made for timing are gone: the tier adds them (or not) by the choice
    assert all(getattr(linear, "blocked", None) is None for linear in model.linears())
    assert torch.equal(model.lm_head(x), before)
    assert "measured" in choice.describe()


def test_a_choice_is_kept_per_machine_and_reused(model_dir, cache_home, monkeypatch):
    model = load_model(model_dir, "fp16")
    first = cpu_paths.choose_layout(model, "fp16", (1,))
    kept = json.loads(cpu_paths.cache_path().read_text())
    assert cpu_paths.cache_path().is_relative_to(cache_home) and len(kept) == 1
    assert next(iter(kept.values()))["layout"] == first.layout

    def measured_again(*_):
        raise AssertionError("a kept choice is measured again")

    monkeypatch.setattr(cpu_paths, "measure_layouts", measured_again)
    assert cpu_paths.choose_layout(model, "fp16", (1,)) == first
    with pytest.raises(AssertionError):  # another kind of tier (other rows) measures its own
        cpu_paths.choose_layout(model, "fp16", (1, 4))
