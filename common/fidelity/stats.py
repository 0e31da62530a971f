"""95 % intervals for task-suite accuracy, and for the change in accuracy between two configurations that ran
the same items.

An accuracy gets the Wilson score interval: unlike the normal (Wald) interval it stays inside [0, 1] and keeps
its width at 0 % or 100 %.

A difference (config - reference over the same items) gets Newcombe's hybrid score interval for paired
proportions (Newcombe 1998, "Improved confidence intervals for the difference between binomial proportions
based on paired data", method 10): the two Wilson intervals combined through the (continuity-corrected)
correlation of the paired outcomes. Pairing is what makes a small drop detectable, since only the items on which the two configurations
disagree carry information. The simpler paired normal (Wald) interval was not chosen because a faithful format
disagrees with fp32 on a handful of items, and there the Wald interval is too narrow (four losses and no gain
out of 300 already read as significant, when an exact McNemar test gives p = 0.125) and collapses to zero width
with no disagreement at all. An exact McNemar-based interval bounds an odds ratio, not the difference in points
the gate is stated in. Newcombe's interval stays inside [-1, 1], keeps a width when the two agree everywhere,
and covers close to 95 % at these sizes.
"""

import math
from dataclasses import dataclass

Z_95 = 1.959963984540054  # the standard normal's 97.5th percentile


@dataclass(frozen=True)
class Proportion:
    """An accuracy over num_items items, with its 95 % Wilson interval."""

    estimate: float
    low: float
    high: float
    num_items: int


@dataclass(frozen=True)
class PairedDifference:
    """config - reference accuracy over the same items, with its 95 % Newcombe interval; num_gained items the
    config gets right and the reference wrong, num_lost the other way round."""

    estimate: float
    low: float
    high: float
    num_items: int
    num_gained: int
    num_lost: int


def wilson(num_correct: int, num_items: int, z: float = Z_95) -> Proportion:
    if num_items <= 0 or not 0 <= num_correct <= num_items:
        raise ValueError(f"need 0 <= correct <= items and items > 0, got {num_correct} of {num_items}")
    p = num_correct / num_items
    denominator = 1 + z * z / num_items
    centre = (p + z * z / (2 * num_items)) / denominator
    half = z * math.sqrt(p * (1 - p) / num_items + z * z / (4 * num_items * num_items)) / denominator
    # At 0 % or 100 % one bound equals the estimate exactly; the clamps keep rounding from crossing it.
    return Proportion(p, min(p, max(0.0, centre - half)), max(p, min(1.0, centre + half)), num_items)


def accuracy(outcomes: list[bool]) -> Proportion:
    return wilson(sum(outcomes), len(outcomes))


def paired_difference(config: list[bool], reference: list[bool], z: float = Z_95) -> PairedDifference:
    if len(config) != len(reference) or not config:
        raise ValueError(f"paired outcomes need the same items, at least one: got {len(config)} and {len(reference)}")
    n = len(config)
    both = sum(c and r for c, r in zip(config, reference))
    gained = sum(c and not r for c, r in zip(config, reference))
    lost = sum(r and not c for c, r in zip(config, reference))
    neither = n - both - gained - lost
    p1, p2 = wilson(both + gained, n, z), wilson(both + lost, n, z)
    # Correlation of the paired outcomes (phi), a positive one reduced by n / 2 as a continuity correction
    # (Newcombe's method 10, as in Altman et al., "Statistics with confidence"); 0 where a margin is empty.
    margins = (both + gained) * (lost + neither) * (both + lost) * (gained + neither)
    excess = both * neither - gained * lost
    excess = max(0.0, excess - n / 2) if excess > 0 else excess
    phi = excess / math.sqrt(margins) if margins else 0.0
    d1_low, d1_high = p1.estimate - p1.low, p1.high - p1.estimate
    d2_low, d2_high = p2.estimate - p2.low, p2.high - p2.estimate
    below = math.sqrt(max(0.0, d1_low ** 2 - 2 * phi * d1_low * d2_high + d2_high ** 2))
    above = math.sqrt(max(0.0, d1_high ** 2 - 2 * phi * d1_high * d2_low + d2_low ** 2))
    estimate = (gained - lost) / n
    return PairedDifference(estimate, max(-1.0, estimate - below), min(1.0, estimate + above), n, gained, lost)
