"""The fidelity gate at a tier's start-up: before serving, score this tier's weight format against fp32 on
the perplexity texts of `evals/` and refuse to start when it regresses past the flags given.

    pdserve decode --weights int4-g128 --fidelity-max-ppl-increase 0.1     # exits 2: perplexity +86 %
"""

import logging

from common.fidelity.harness import REFERENCE, Gate, evaluate
from common.fidelity.suites import DEFAULT_SUITES_DIR, load_suites

log = logging.getLogger(__name__)


class FidelityGateFailed(ValueError):
    """The configuration failed the gate; the message says by how much (the CLI prints it and exits 2)."""


def check_startup_fidelity(model_dir, weights: str, max_ppl_increase: float | None,
                           min_agreement: float | None) -> None:
    if (max_ppl_increase is None and min_agreement is None) or weights == REFERENCE:
        return
    suites = [s for s in load_suites(DEFAULT_SUITES_DIR) if s.is_perplexity]
    result = evaluate(model_dir, [weights], suites, Gate(max_ppl_increase, min_agreement))[-1]
    summary = (f"weights {weights}: perplexity {result.ppl_increase:+.1%} against fp32, top-1 agreement "
               f"{result.top1_agreement:.1%}")
    if result.failures:
        raise FidelityGateFailed(f"refusing to serve: fidelity gate failed ({'; '.join(result.failures)}); "
                                 f"{summary}. Choose a more faithful --weights format or relax the gate flags.")
    log.info("fidelity gate passed: %s", summary)
