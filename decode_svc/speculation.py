"""Speculative decoding on the decode tier: a proposer guesses the next k tokens of a sequence, one
batched target forward scores them all (inside the normal continuous batch), and an acceptance rule
keeps a prefix of them plus one token of the target's own, so the output is exactly what decoding
without speculation would produce: token for token when greedy, in distribution when sampling
(rejection sampling, Leviathan et al. 2023 / Chen et al. 2023).

Speculation pays only while decode is memory-bound and proposals are often right, so each sequence
adapts its k from recent acceptance and stops proposing when it loses; large batches do not speculate.
No torch here except in `verify` and `choose` (and the tensors a Proposal carries).
"""

from dataclasses import dataclass, field
from typing import Protocol

import torch

from common.basics.config import SPECULATIVE_METHODS
from common.basics.sampling import SamplingConfig, TokenLogprob
from common.model.constraint import Constraint, masked
from common.model.sampling import (
    draw,
    probabilities,
    sample,
    shape,
    token_logprobs,
    uniform,
)


@dataclass(frozen=True)
class SpeculationConfig:
    method: str = "none"
    num_tokens: int = 4  # most tokens proposed per step
    max_batch_size: int = 8  # above this many running sequences decode is compute-bound: no speculation
    adaptive: bool = True  # per-sequence k from acceptance and measured costs; False: always num_tokens

    def __post_init__(self) -> None:
        if self.method not in SPECULATIVE_METHODS:
            raise ValueError(f"speculative method must be one of {SPECULATIVE_METHODS}, got {self.method!r}")
        if not 1 <= self.num_tokens <= 16:
            raise ValueError(f"num_speculative_tokens must be in [1, 16], got {self.num_tokens}")


@dataclass(frozen=True)
class Proposal:
    """A sequence's draft tokens for one step, and for a sampled draft the distributions they came from."""

    tokens: list[int] = field(default_factory=list)
    probs: torch.Tensor | None = None  # (len(tokens), vocab) the draft's q per token; None: point masses


class Proposer(Protocol):
    def propose(self, context: list[int], k: int) -> list[int]: ...


class PromptLookupProposer:
    """Finds the latest earlier occurrence of the context's last n tokens (n from max_ngram down to
    min_ngram) and proposes what followed it. No model: it wins on extractive text (quotes, edits, code).

    A one-token match is mostly chance (a common word or punctuation), and on a CPU a failed proposal still
    costs its verification. Replaying the extractive bench's greedy answers, requiring two tokens raised the
    modelled speedup from 1.47-1.63x to 1.58-1.85x, and up to 8 drafts to 1.71-2.17x
    (scripts/micro/prompt_lookup_replay.py)."""

    def __init__(self, max_ngram: int = 5, min_ngram: int = 2) -> None:
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError(f"need 1 <= min_ngram <= max_ngram, got {min_ngram} and {max_ngram}")
        self.max_ngram, self.min_ngram = max_ngram, min_ngram

    def propose(self, context: list[int], k: int) -> list[int]:
        for n in range(min(self.max_ngram, len(context) - 1), self.min_ngram - 1, -1):
            tail = context[-n:]
            for start in range(len(context) - n - 1, -1, -1):
                if context[start:start + n] == tail:
                    return context[start + n:start + n + k]
        return []


@dataclass
class SpecState:
    """A sequence's speculation: its acceptance so far, the k that pays best, and counters for the client.

    Acceptance is modelled per token (a draft token is right with probability `rate`, independently), so
    a step proposing k tokens yields (1 - rate^(k+1)) / (1 - rate) tokens on average, and costs
    `step_costs[k]` plain steps (measured at start-up). k is the best ratio; 0 when nothing beats plain
    decoding, after which the sequence rests a few steps and probes with k = 1.
    """

    max_k: int
    step_costs: tuple[float, ...] = ()  # step_costs[k]: cost of proposing and verifying k drafts, in plain steps
    adaptive: bool = True  # False: always propose max_k (to measure a proposer's acceptance)
    rate: float = 0.7  # estimated per-token acceptance; optimistic at first
    cooldown: int = 0
    num_proposed: int = 0
    num_accepted: int = 0
    num_verify_steps: int = 0
    num_verify_tokens: int = 0  # tokens produced by steps that verified proposals
    _SMOOTHING: float = field(default=0.3, repr=False)
    _REST_STEPS: int = field(default=8, repr=False)

    def next_k(self) -> int:
        if not self.adaptive:
            return self.max_k
        if self.cooldown > 0:
            self.cooldown -= 1
            return 1 if self.cooldown == 0 else 0  # the last resting step probes
        best_k, best_gain = 0, 1.0
        for k in range(1, self.max_k + 1):
            cost = self.step_costs[k] if k < len(self.step_costs) else 1.0 + k
            gain = expected_tokens(self.rate, k) / cost
            if gain > best_gain:
                best_k, best_gain = k, gain
        if best_k == 0:
            self.cooldown = self._REST_STEPS
        return best_k

    def record(self, proposed: int, accepted: int) -> None:
        self.num_proposed += proposed
        self.num_accepted += accepted
        self.num_verify_steps += 1
        self.num_verify_tokens += accepted + 1
        trials = accepted + (1 if accepted < proposed else 0)  # draws until the first rejection
        self.rate += self._SMOOTHING * (accepted / trials - self.rate)


def expected_tokens(rate: float, k: int) -> float:
    """Mean tokens one verify step yields with k drafts, each right with probability rate."""
    return float(k + 1) if rate >= 1 else (1 - rate ** (k + 1)) / (1 - rate)


def verify(logits: torch.Tensor, draft: list[int], config: SamplingConfig, first_step: int,
           draft_probs: torch.Tensor | None = None, context: list[int] | None = None,
           constraint: Constraint | None = None) -> list[int]:
    """logits: (len(draft) + 1, vocab), row i scoring the token after draft[:i]. Returns the accepted
    draft prefix plus one token from the target: len(result) - 1 drafts were accepted.

    draft_probs: (len(draft), vocab), row i the distribution draft[i] was drawn from (a draft model's q);
    None for a deterministic proposer (a point mass on each draft token). Sampling accepts draft token d
    with probability min(1, p(d) / q(d)) and, on rejection, draws from max(0, p - q) renormalised, so the
    output follows p exactly. `first_step` is the index of the token the first row produces (for the
    per-request generator). `context`: every token before the first row's (prompt and output), which the
    request's penalties and minimum length read; row i sees it followed by draft[:i]. `constraint`: the
    request's grammar, standing at the output so far; row i may choose only what it allows after draft[:i], so a
    draft token outside the grammar is never accepted.
    """
    if config.shapes_logits:
        context = context or []
        logits = torch.stack([shape(logits[i], config, context + draft[:i], first_step + i)
                              for i in range(len(draft) + 1)])
    if constraint is not None:
        logits = torch.stack([masked(logits[i], mask) for i, mask in enumerate(constraint.along(draft))])
    if config.greedy:
        targets = logits.argmax(dim=-1).tolist()
        accepted = 0
        while accepted < len(draft) and draft[accepted] == targets[accepted]:
            accepted += 1
        return [*draft[:accepted], targets[accepted]]
    out = []
    for i, token in enumerate(draft):
        p = probabilities(logits[i], config)  # (vocab,)
        q_token = 1.0 if draft_probs is None else float(draft_probs[i, token])
        if uniform(config, first_step + i) * q_token < float(p[token]):
            out.append(token)
            continue
        return [*out, draw(_residual(p, token, None if draft_probs is None else draft_probs[i]), config,
                           first_step + i)]
    return [*out, draw(probabilities(logits[len(draft)], config), config, first_step + len(draft))]


def _residual(p: torch.Tensor, token: int, q: torch.Tensor | None) -> torch.Tensor:
    """norm(max(0, p - q)) after draft `token` was rejected; q None is a point mass on `token`."""
    if q is None:
        residual = p.clone()
        residual[token] = 0.0
    else:
        residual = (p - q.to(p.device, p.dtype)).clamp_(min=0.0)  # (vocab,)
    total = float(residual.sum())
    # Rejection happens only where p(d) < q(d), so p - q has positive mass; guard rounding all the same.
    return residual / total if total > 0 else p


def choose(batch: list, proposals: list[Proposal], logits: torch.Tensor) -> list[list[int]]:
    """Each sequence's new tokens from one step's logits (rows: its token, then its drafts): a sample for the
    sequences that proposed nothing, all sampled together; verification for the others, recorded in their
    SpecState. batch: Sequences (sampling, tokens, spec)."""
    drafts = [p.tokens for p in proposals]
    rows = torch.tensor([0, *[1 + len(d) for d in drafts]]).cumsum(0).tolist()
    plain = [i for i, d in enumerate(drafts) if not d]
    chosen: list[list[int]] = [[] for _ in batch]
    if plain:
        last_rows = logits[[rows[i] for i in plain]]
        masks = [batch[i].constraint.allowed() if batch[i].constraint else None for i in plain]
        for i, token in zip(plain, sample(last_rows, [batch[i].sampling for i in plain],
                                          [batch[i].next_step for i in plain], [batch[i].context for i in plain],
                                          masks)):
            chosen[i] = [token]
    for i, draft in enumerate(drafts):
        if draft:
            seq = batch[i]
            chosen[i] = verify(logits[rows[i]:rows[i + 1]], draft, seq.sampling, seq.next_step, proposals[i].probs,
                               seq.context, seq.constraint)
            seq.spec.record(len(draft), len(chosen[i]) - 1)
    for seq, tokens in zip(batch, chosen):
        if seq.constraint is not None:
            seq.constraint.advance(tokens)
    return chosen


def chosen_logprobs(batch: list, proposals: list[Proposal], logits: torch.Tensor,
                    chosen: list[list[int]]) -> list[list[TokenLogprob] | None]:
    """The log-probabilities of each sequence's chosen tokens (None where its sampling asks for none): token k
    of a sequence was chosen from its row k (its own token's row, then one per accepted draft token)."""
    rows = torch.tensor([0, *[1 + len(p.tokens) for p in proposals]]).cumsum(0).tolist()
    found: list[list[TokenLogprob] | None] = []
    for i, (seq, tokens) in enumerate(zip(batch, chosen)):
        top_n = seq.sampling.logprobs
        found.append(None if top_n is None else
                     token_logprobs(logits[rows[i]:rows[i] + len(tokens)], tokens, top_n))
    return found
