"""Grouping a decode batch by context length: exact groups for the cases that matter."""

from common.model.decode_groups import plan_groups


def test_similar_lengths_stay_one_group():
    assert plan_groups([8, 9, 10, 12]) == [[0, 1, 2, 3]]
    assert plan_groups([5]) == [[0]]


def test_one_long_context_among_many_short_gets_its_own_group():
    assert plan_groups([8] * 10 + [64]) == [list(range(10)), [10]]
    # sorted by length, so a long sequence anywhere in the batch is split off the same way
    assert plan_groups([64, 8, 8, 8]) == [[1, 2, 3], [0]]


def test_splitting_only_when_the_padding_saved_beats_the_group_overhead():
    # merged: 24 + 2 x 30 = 84; split: (24 + 2) + (24 + 30) = 80
    assert plan_groups([2, 30], overhead_blocks=24) == [[0], [1]]
    # merged: 24 + 2 x 20 = 64; split: (24 + 2) + (24 + 20) = 70
    assert plan_groups([2, 20], overhead_blocks=24) == [[0, 1]]


def test_every_sequence_lands_in_exactly_one_group():
    lengths = [3, 70, 5, 33, 70, 1, 12, 40, 2, 90]
    groups = plan_groups(lengths, overhead_blocks=4)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    assert len(groups) > 1
    for earlier, later in zip(groups, groups[1:]):
        assert max(lengths[i] for i in earlier) <= min(lengths[i] for i in later)
