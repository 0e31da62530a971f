"""The draft's training batches and loss, on synthetic samples (no weights): which positions are scored,
how the target's top-k maps onto the draft's head, and that the loss is the soft cross-entropy."""

import random

import torch

from pdserve.distill.corpus import Sample
from pdserve.distill.distill import head_token_ids
from pdserve.distill.train import batch_loss, make_batches


def _sample(prompt: list[int], answer: list[int], top: list[list[int]]) -> Sample:
    ids = torch.tensor(top)
    return Sample(prompt + answer, len(prompt), ids, torch.full(ids.shape, 1.0 / ids.shape[1]))


def test_only_positions_that_predict_answer_tokens_are_scored_and_unknown_tokens_are_dropped():
    samples = [_sample([5, 6, 7], [8, 9], [[8, 3], [9, 99]]), _sample([5], [7, 8, 9], [[7, 8], [8, 7], [9, 8]])]
    head = torch.tensor([3, 7, 8, 9])
    [batch] = make_batches(samples, head, batch_tokens=64, rng=random.Random(0))
    length = batch.token_ids.shape[1]
    assert length == 4  # the longest input: prompt + answer minus the last token
    first = 0 if batch.token_ids[0, 0] == 5 and batch.token_ids[0, 1] == 6 else 1
    by_sample = {first: [2, 3], 1 - first: [0, 1, 2]}  # position prompt_len - 1 predicts answer token 0
    expected_rows = sorted(b * length + p for b, positions in by_sample.items() for p in positions)
    assert sorted(batch.rows.tolist()) == expected_rows
    assert batch.teacher_index.tolist().count([3, -1]) == 1  # [9, 99]: 9 is head token 3, 99 is not in the head


def test_the_loss_is_the_soft_cross_entropy_and_agreement_counts_top_tokens():
    class Fixed:
        def hidden(self, token_ids):
            return torch.zeros(*token_ids.shape, 2)

        def head_logits(self, hidden):
            return torch.tensor([[0.0, 2.0]]).expand(hidden.shape[0], 2)  # always prefers head token 1

    samples = [_sample([1], [4, 4], [[4, 3], [3, 4]])]
    [batch] = make_batches(samples, torch.tensor([3, 4]), batch_tokens=64, rng=random.Random(0))
    loss, agree = batch_loss(Fixed(), batch)
    log_q = torch.log_softmax(torch.tensor([0.0, 2.0]), dim=0)
    assert torch.isclose(loss, -(0.5 * log_q).sum())
    assert agree == 0.5  # the draft's top token (4) is the target's top token at the first position only


def test_the_head_covers_the_most_written_tokens_and_always_eos_then_the_lowest_ids():
    samples = [_sample([1], [7, 7, 7, 8, 8, 9], [[7, 9]] * 6)]  # the target put half its mass on 9 each time
    assert head_token_ids(samples, 3, always=(2,), vocab_size=20).tolist() == [2, 7, 9]
    assert head_token_ids(samples, 6, always=(2,), vocab_size=20).tolist() == [0, 1, 2, 7, 8, 9]
