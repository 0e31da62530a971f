"""Sampling: greedy, seeded reproducibility, top-k / top-p, and the distribution of sampled tokens."""

import math

import pytest
import torch

from common.basics.sampling import SamplingConfig
from common.model.sampling import sample

# Critical value of the chi-square distribution with 4 degrees of freedom at p = 0.001.
_CHI2_DF4_P001 = 18.467


def random_logits(rows: int = 1, vocab: int = 1000, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * 3  # (rows, vocab)


def draw(logits: torch.Tensor, config: SamplingConfig, step: int = 0) -> int:
    return sample(logits[None], [config], [step])[0]


def test_greedy_picks_the_argmax_of_every_row():
    logits = random_logits(rows=4)
    tokens = sample(logits, [SamplingConfig()] * 4, [0, 1, 2, 3])
    assert tokens == logits.argmax(dim=-1).tolist()


def test_same_seed_and_step_give_the_same_token():
    logits = random_logits()[0]
    config = SamplingConfig(temperature=1.0, seed=1234)
    assert [draw(logits, config, step) for step in range(20)] == [draw(logits, config, step) for step in range(20)]


def test_seeded_token_does_not_depend_on_the_rest_of_the_batch():
    logits = random_logits(rows=3)
    config = SamplingConfig(temperature=1.0, seed=7)
    alone = draw(logits[1], config, step=5)
    others = SamplingConfig(temperature=0.5, seed=99)
    assert sample(logits, [others, config, SamplingConfig()], [0, 5, 3])[1] == alone


def test_tokens_differ_across_steps_and_across_seeds():
    logits = torch.zeros(1000)  # uniform: any two draws coincide with probability 1/1000
    across_steps = {draw(logits, SamplingConfig(temperature=1.0, seed=3), step) for step in range(20)}
    across_seeds = {draw(logits, SamplingConfig(temperature=1.0, seed=seed), 0) for seed in range(20)}
    assert len(across_steps) >= 15
    assert len(across_seeds) >= 15


def test_top_k_1_gives_the_argmax_even_at_high_temperature():
    logits = random_logits()[0]
    tokens = {draw(logits, SamplingConfig(temperature=100.0, top_k=1, seed=s), s) for s in range(50)}
    assert tokens == {int(logits.argmax())}


def test_tiny_top_p_gives_the_argmax():
    logits = random_logits()[0]
    tokens = {draw(logits, SamplingConfig(temperature=5.0, top_p=1e-6, seed=s), s) for s in range(50)}
    assert tokens == {int(logits.argmax())}


def test_top_k_keeps_only_the_k_most_likely_tokens():
    logits = random_logits()[0]
    top3 = set(torch.topk(logits, 3).indices.tolist())
    tokens = {draw(logits, SamplingConfig(temperature=50.0, top_k=3, seed=s), 0) for s in range(200)}
    assert tokens == top3


def test_tiny_positive_temperature_behaves_like_greedy():
    logits = torch.tensor([1.0, 20.0, 3.0])
    for temperature in (1e-3, 1e-30, 1e-40):
        assert draw(logits, SamplingConfig(temperature=temperature, seed=1)) == 1, temperature


@pytest.mark.parametrize("temperature", [0.7, 2.0])
def test_sampled_frequencies_follow_softmax_of_scaled_logits(temperature):
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0])
    num_draws = 4000
    tokens = [draw(logits, SamplingConfig(temperature=temperature, seed=seed)) for seed in range(num_draws)]
    observed = torch.bincount(torch.tensor(tokens), minlength=5).double()
    expected = torch.softmax(logits.double() / temperature, dim=0) * num_draws
    chi2 = float(((observed - expected) ** 2 / expected).sum())
    assert chi2 < _CHI2_DF4_P001, (observed.tolist(), expected.tolist())


@pytest.mark.parametrize(
    "kwargs",
    [
        {"temperature": -0.1},
        {"temperature": math.nan},
        {"temperature": math.inf},
        {"temperature": -math.inf},
        {"top_p": 0.0},
        {"top_p": 1.01},
        {"top_p": -0.5},
        {"top_p": math.nan},
        {"top_k": -1},
    ],
)
def test_invalid_sampling_config_raises_value_error(kwargs):
    with pytest.raises(ValueError):
        SamplingConfig(**kwargs)


def test_boundary_sampling_values_are_accepted():
    config = SamplingConfig(temperature=0.0, top_p=1.0, top_k=0)
    assert config.greedy
    assert not SamplingConfig(temperature=1e-3).greedy
