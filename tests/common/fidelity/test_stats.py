"""Intervals of common/fidelity/stats.py: properties any sane interval has, checked over random outcomes, a
textbook value, and the paired interval's coverage at known rates."""

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from common.fidelity.stats import accuracy, paired_difference, wilson

outcomes = st.lists(st.booleans(), min_size=1, max_size=400)
pairs = st.lists(st.tuples(st.booleans(), st.booleans()), min_size=1, max_size=400)


@given(outcomes)
def test_an_accuracy_interval_holds_its_estimate_inside_zero_and_one(right):
    p = accuracy(right)
    assert 0.0 <= p.low <= p.estimate <= p.high <= 1.0
    assert p.estimate == sum(right) / len(right) and p.high > p.low


@given(st.integers(1, 50), st.integers(2, 20))
def test_an_accuracy_interval_narrows_as_the_items_grow(num_items, factor):
    for rate in (0.0, 0.3, 0.5, 1.0):
        small, large = wilson(round(rate * num_items), num_items), wilson(round(rate * num_items) * factor,
                                                                          num_items * factor)
        assert large.high - large.low < small.high - small.low


@given(pairs)
def test_a_paired_difference_holds_its_estimate_inside_minus_one_and_one(pairs):
    config, reference = [c for c, _ in pairs], [r for _, r in pairs]
    d = paired_difference(config, reference)
    assert -1.0 <= d.low <= d.estimate <= d.high <= 1.0
    assert d.estimate == pytest.approx(accuracy(config).estimate - accuracy(reference).estimate)
    assert d.num_gained - d.num_lost == sum(config) - sum(reference)


@given(pairs)
def test_swapping_the_configurations_mirrors_the_interval(pairs):
    config, reference = [c for c, _ in pairs], [r for _, r in pairs]
    forward, backward = paired_difference(config, reference), paired_difference(reference, config)
    assert forward.estimate == pytest.approx(-backward.estimate)
    assert forward.low == pytest.approx(-backward.high) and forward.high == pytest.approx(-backward.low)


@given(outcomes)
def test_identical_outcomes_differ_by_nothing_significant(right):
    d = paired_difference(right, right)
    assert d.estimate == 0 and d.num_gained == d.num_lost == 0 and d.low <= 0 <= d.high


@given(st.integers(2, 8))
def test_the_same_disagreement_over_more_items_narrows_the_interval(factor):
    config = [True] * 50 + [False] * 40 + [True] * 5 + [False] * 5
    reference = [True] * 50 + [False] * 40 + [False] * 5 + [True] * 5
    small, large = paired_difference(config, reference), paired_difference(config * factor, reference * factor)
    assert large.high - large.low < small.high - small.low


def test_wilson_of_eight_in_ten():
    p = wilson(8, 10)  # the textbook example: 0.490 to 0.943
    assert (round(p.low, 3), round(p.high, 3)) == (0.490, 0.943)


@pytest.mark.parametrize("rates, num_items", [((0.6, 0.02, 0.05), 300), ((0.5, 0.1, 0.1), 100)])
def test_the_paired_interval_covers_the_true_difference_about_95_times_in_100(rates, num_items):
    """Draws of (both right, gained, lost, both wrong) at known rates: the interval holds rate(gained) -
    rate(lost) in 93 to 98 % of 1,000 draws."""
    both, gained, lost = rates
    rng = random.Random(0)
    covered = 0
    for _ in range(1000):
        config, reference = [], []
        for u in (rng.random() for _ in range(num_items)):
            config.append(u < both + gained)
            reference.append(u < both or both + gained <= u < both + gained + lost)
        d = paired_difference(config, reference)
        covered += d.low <= gained - lost <= d.high
    assert 930 <= covered <= 980


def test_four_losses_and_no_gain_in_three_hundred_is_not_yet_significant():
    """The paired Wald interval calls this a drop; an exact McNemar test gives p = 0.125."""
    reference = [True] * 200 + [False] * 100
    config = [False] * 4 + [True] * 196 + [False] * 100
    d = paired_difference(config, reference)
    assert d.high > 0 > d.low
    eight = paired_difference([False] * 8 + [True] * 192 + [False] * 100, reference)
    assert eight.high < 0  # McNemar: p = 0.008


def test_mismatched_outcomes_are_refused():
    with pytest.raises(ValueError):
        paired_difference([True], [True, False])
    with pytest.raises(ValueError):
        wilson(3, 2)
