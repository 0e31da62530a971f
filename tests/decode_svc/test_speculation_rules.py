"""Speculative decoding's pure parts: prompt lookup, adaptive k, and the acceptance rule, whose
sampled output must follow the target distribution exactly (a broken rule must fail the same test)."""

import pytest
import torch

from common.basics.sampling import SamplingConfig
from common.model.sampling import shape
from decode_svc.speculation import (
    PromptLookupProposer,
    SpecState,
    SpeculationConfig,
    expected_tokens,
    verify,
)

# Chi-square critical value, 5 degrees of freedom, p = 0.001.
_CHI2_DF5_P001 = 20.515


def test_prompt_lookup_proposes_what_followed_the_latest_match():
    context = [1, 2, 3, 4, 5, 9, 2, 3, 4, 6, 7, 2, 3]
    assert PromptLookupProposer(max_ngram=3).propose(context, 3) == [4, 6, 7]


def test_prompt_lookup_falls_back_to_shorter_ngrams_and_to_nothing():
    proposer = PromptLookupProposer(max_ngram=3, min_ngram=1)
    assert proposer.propose([5, 6, 7, 8, 1, 9, 7], 2) == [8, 1]
    assert proposer.propose([1, 2, 3, 4], 2) == []


def test_prompt_lookup_by_default_needs_two_tokens_and_prefers_the_longest_match():
    proposer = PromptLookupProposer()
    assert proposer.propose([5, 6, 7, 8, 1, 9, 7], 2) == []  # one token matches: chance, not copying
    context = [1, 2, 3, 4, 5, 9, 9, 3, 4, 5, 7, 8, 6, 2, 3, 4, 5]
    assert proposer.propose(context, 3) == [9, 9, 3]  # 2 3 4 5 beats the later 3 4 5


def test_k_follows_acceptance_against_the_measured_step_costs():
    costs = (1.0, 1.3, 1.5, 1.7, 1.9)  # verifying k drafts costs costs[k] plain steps
    state = SpecState(max_k=4, step_costs=costs)
    for _ in range(10):
        state.record(proposed=4, accepted=4)
    assert state.next_k() == 4  # everything accepted: the longest proposal pays most
    for _ in range(10):
        state.record(proposed=4, accepted=0)
    assert state.next_k() == 0  # nothing accepted: plain decoding, then a rest
    assert [state.next_k() for _ in range(8)] == [0] * 7 + [1]  # ... and a cheap probe
    assert state.num_proposed == 80 and state.num_accepted == 40 and state.num_verify_steps == 20


def test_expensive_verification_turns_speculation_off():
    state = SpecState(max_k=4, step_costs=(1.0, 2.5, 3.5, 4.5, 5.5), rate=0.6)
    assert state.next_k() == 0


def test_expected_tokens_per_verify_step():
    assert expected_tokens(1.0, 3) == 4
    assert expected_tokens(0.0, 3) == 1
    assert abs(expected_tokens(0.5, 2) - 1.75) < 1e-9


def test_speculation_config_rejects_unknown_methods():
    with pytest.raises(ValueError, match="speculative method"):
        SpeculationConfig(method="telepathy")


def test_greedy_verify_accepts_the_agreeing_prefix_plus_the_target_token():
    logits = torch.full((4, 10), -5.0)
    for row, best in enumerate([3, 7, 2, 8]):
        logits[row, best] = 5.0
    greedy = SamplingConfig()
    assert verify(logits, [3, 7, 2], greedy, 0) == [3, 7, 2, 8]
    assert verify(logits, [3, 1, 2], greedy, 0) == [3, 7]
    assert verify(logits, [0, 7, 2], greedy, 0) == [3]


def _first_token_counts(accept_rule, trials: int = 3000) -> tuple[torch.Tensor, torch.Tensor]:
    target_logits = torch.tensor([1.5, 0.7, 0.2, -0.3, -1.0, 0.9])
    logits = torch.stack([target_logits, torch.zeros(6)])
    counts = torch.zeros(6)
    for seed in range(trials):
        config = SamplingConfig(temperature=1.0, seed=seed)
        counts[accept_rule(logits, [5], config, 0)[0]] += 1
    return counts, torch.softmax(target_logits, dim=0) * trials


def test_rejection_sampling_keeps_the_target_distribution():
    counts, expected = _first_token_counts(verify)
    assert float(((counts - expected) ** 2 / expected).sum()) < _CHI2_DF5_P001


def test_the_same_check_catches_a_rule_that_always_accepts():
    def always_accept(logits, draft, config, first_step):
        return [*draft, 0]

    counts, expected = _first_token_counts(always_accept)
    assert float(((counts - expected) ** 2 / expected).sum()) > _CHI2_DF5_P001


def test_the_same_check_catches_a_rule_that_resamples_without_removing_the_draft():
    from common.model.sampling import draw, probabilities, uniform

    def sloppy(logits, draft, config, first_step):
        probs = probabilities(logits[0], config)
        if uniform(config, first_step) < float(probs[draft[0]]):
            return [draft[0]]
        return [draw(probs, config, first_step)]  # should exclude the draft token and renormalise

    counts, expected = _first_token_counts(sloppy)
    assert float(((counts - expected) ** 2 / expected).sum()) > _CHI2_DF5_P001


# A draft model proposes d ~ q, a distribution of its own: the rule must use q (accept with min(1, p/q),
# on rejection draw from norm(max(0, p - q))). Target p as above; q a random draft distribution unlike p.
_TARGET_LOGITS = torch.tensor([1.5, 0.7, 0.2, -0.3, -1.0, 0.9])
_DRAFT_Q = torch.softmax(torch.randn(6, generator=torch.Generator().manual_seed(3)) * 1.5, dim=0)


def _draft_first_token_counts(accept_rule, trials: int = 3000) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(counts of the first output token, expected counts under p, drafts accepted) over `trials` seeds,
    the draft token drawn from q by a generator of its own."""
    logits = torch.stack([_TARGET_LOGITS, torch.zeros(6)])
    counts, accepted = torch.zeros(6), 0
    for seed in range(trials):
        config = SamplingConfig(temperature=1.0, seed=seed)
        draft = int(torch.multinomial(_DRAFT_Q, 1, generator=torch.Generator().manual_seed(10**6 + seed)))
        out = accept_rule(logits, [draft], config, 0, _DRAFT_Q[None, :])
        counts[out[0]] += 1
        accepted += len(out) - 1
    return counts, torch.softmax(_TARGET_LOGITS, dim=0) * trials, accepted


def _chi2(counts: torch.Tensor, expected: torch.Tensor) -> float:
    return float(((counts - expected) ** 2 / expected).sum())


def test_rejection_sampling_with_draft_probabilities_keeps_the_target_distribution():
    counts, expected, accepted = _draft_first_token_counts(verify)
    assert _chi2(counts, expected) < _CHI2_DF5_P001
    # Accepting with min(1, p/q) keeps sum(min(p, q)) = 0.79 of the drafts here.
    assert 0.74 < accepted / 3000 < 0.83


def test_the_point_mass_rule_stays_exact_for_a_sampled_draft_but_accepts_far_less():
    def point_mass(logits, draft, config, first_step, draft_probs):
        return verify(logits, draft, config, first_step)  # ignores q: accepts with p(d)

    counts, expected, accepted = _draft_first_token_counts(point_mass)
    assert _chi2(counts, expected) < _CHI2_DF5_P001
    assert accepted / 3000 < 0.3  # sum(p * q) = 0.24: why verify takes q


def test_the_draft_check_catches_a_rule_that_draws_the_residual_from_p():
    from common.model.sampling import draw, probabilities, uniform

    def residual_from_p(logits, draft, config, first_step, draft_probs):
        p, q = probabilities(logits[0], config), draft_probs[0]
        if uniform(config, first_step) * float(q[draft[0]]) < float(p[draft[0]]):
            return [draft[0]]
        return [draw(p, config, first_step)]  # should draw from norm(max(0, p - q))

    counts, expected, _ = _draft_first_token_counts(residual_from_p)
    assert _chi2(counts, expected) > _CHI2_DF5_P001


def test_the_draft_check_catches_a_point_mass_residual_after_a_q_acceptance():
    from common.model.sampling import draw, probabilities, uniform

    def mixed_rules(logits, draft, config, first_step, draft_probs):
        p, q = probabilities(logits[0], config), draft_probs[0]
        if uniform(config, first_step) * float(q[draft[0]]) < float(p[draft[0]]):
            return [draft[0]]
        residual = p.clone()
        residual[draft[0]] = 0.0  # the point-mass residual does not fit the min(1, p/q) acceptance
        return [draw(residual / residual.sum(), config, first_step)]

    counts, expected, _ = _draft_first_token_counts(mixed_rules)
    assert _chi2(counts, expected) > _CHI2_DF5_P001


def test_fixed_k_always_proposes_the_most():
    state = SpecState(max_k=3, step_costs=(1.0, 9.0, 9.0, 9.0), adaptive=False)
    for _ in range(5):
        state.record(proposed=3, accepted=0)
    assert [state.next_k() for _ in range(4)] == [3, 3, 3, 3]


def test_verification_shapes_each_row_with_the_draft_before_it():
    """Greedy verification under a penalty accepts exactly what greedy one-at-a-time decoding would choose."""
    rows = torch.randn(4, 64, generator=torch.Generator().manual_seed(0)) * 4  # row i scores the token after draft[:i]
    config = SamplingConfig(repetition_penalty=5.0, frequency_penalty=1.0)
    context = [9, 8, 7]
    one_at_a_time, seen = [], list(context)
    for i in range(4):
        token = int(shape(rows[i], config, seen, step=i).argmax())
        one_at_a_time.append(token)
        seen.append(token)
    assert verify(rows, one_at_a_time[:3], config, 0, context=context) == one_at_a_time
