"""Penalties and the minimum length, as `shape` applies them to one row of logits: the repetition penalty and
the minimum length equal transformers' own logits processors on the same inputs; presence and frequency
penalties equal OpenAI's definition computed in float64."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers.generation.logits_process import (
    MinNewTokensLengthLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
)

from common.basics.sampling import SamplingConfig
from common.model.sampling import sample, shape

VOCAB = 64
EPS32 = float(np.finfo(np.float32).eps)


def logits_of(seed: int) -> torch.Tensor:
    return torch.randn(VOCAB, generator=torch.Generator().manual_seed(seed)) * 4  # (vocab,) float32


tokens = st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=40)


@settings(max_examples=60, deadline=None)
@given(context=tokens, penalty=st.floats(0.2, 3.0), seed=st.integers(0, 1000))
def test_repetition_penalty_equals_transformers_processor(context, penalty, seed):
    logits = logits_of(seed)
    ours = shape(logits, SamplingConfig(repetition_penalty=penalty), context, step=0)
    theirs = RepetitionPenaltyLogitsProcessor(penalty)(torch.tensor([context]), logits[None].clone())[0]
    assert torch.equal(ours, theirs)  # the same single float32 operation on each logit


@settings(max_examples=60, deadline=None)
@given(prompt=tokens, output=st.lists(st.integers(0, VOCAB - 1), max_size=30),
       presence=st.floats(-2.0, 2.0), frequency=st.floats(-2.0, 2.0), seed=st.integers(0, 1000))
def test_presence_and_frequency_penalties_follow_openais_definition_over_the_output_only(prompt, output, presence,
                                                                                          frequency, seed):
    logits = logits_of(seed)
    config = SamplingConfig(presence_penalty=presence, frequency_penalty=frequency)
    ours = shape(logits, config, prompt + output, step=len(output)).double().numpy()
    expected = logits.double().numpy().copy()
    for token in set(output):
        expected[token] -= presence + frequency * output.count(token)
    # float32: the counts are exact, the products and the sum round once each, the difference once: three
    # roundings of quantities at most |logit| + 2 + 2 * len(output)
    bound = 3 * EPS32 * (np.abs(expected).max() + 2 + 2 * len(output))
    assert np.abs(ours - expected).max() <= bound


@pytest.mark.parametrize("step", [0, 3, 4, 9])
def test_min_new_tokens_holds_back_the_stop_tokens_as_transformers_does(step):
    logits, prompt = logits_of(step), [1, 2, 3]
    context = prompt + list(range(10, 10 + step))
    config = SamplingConfig(min_new_tokens=4, suppress_token_ids=frozenset({5, 7}))
    theirs = MinNewTokensLengthLogitsProcessor(len(prompt), 4, [5, 7])(torch.tensor([context]), logits[None].clone())
    assert torch.equal(shape(logits, config, context, step), theirs[0])


def test_a_held_back_token_is_never_chosen_however_likely_and_ids_outside_the_vocabulary_are_ignored():
    logits = torch.zeros(2, VOCAB)
    logits[:, 5] = 50.0
    config = SamplingConfig(min_new_tokens=2, suppress_token_ids=frozenset({5, VOCAB + 3}))
    sampled = SamplingConfig(temperature=1.0, seed=3, min_new_tokens=2, suppress_token_ids=frozenset({5}))
    assert sample(logits, [config, sampled], [1, 1], [[0], [0]]) != [5, 5]
    assert 5 not in sample(logits, [config, sampled], [1, 1], [[0], [0]])
    assert sample(logits, [config, sampled], [2, 2], [[0], [0]]) == [5, 5]


def test_penalties_need_the_context():
    with pytest.raises(ValueError, match="context"):
        sample(torch.zeros(1, VOCAB), [SamplingConfig(repetition_penalty=1.2)], [0])


@pytest.mark.parametrize("bad, message", [
    ({"repetition_penalty": 0.0}, "repetition_penalty must be a finite number > 0"),
    ({"presence_penalty": 2.5}, "presence_penalty must be in [-2, 2]"),
    ({"frequency_penalty": float("nan")}, "frequency_penalty must be in [-2, 2]"),
    ({"min_new_tokens": -1}, "min_new_tokens must be >= 0"),
])
def test_out_of_range_values_are_refused(bad, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        SamplingConfig(**bad)
