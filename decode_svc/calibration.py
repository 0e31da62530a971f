"""How much a decode step verifying k speculated tokens costs on this machine, relative to a plain step.

Speculation trades extra work per step for fewer steps; on CPUs a few-row matrix product costs far more
than the matrix-vector product of a plain step, so the decode tier measures the trade at start-up.
"""

import time
from collections.abc import Callable
from contextlib import nullcontext
from typing import TYPE_CHECKING

from common.kv.block_manager import BlockManager
from common.model.runner import DecodeItem, ModelRunner

if TYPE_CHECKING:
    from decode_svc.draft import DraftProposer


def measure_step_costs(runner: ModelRunner, blocks: BlockManager, k_max: int, draft: "DraftProposer | None" = None,
                       *, context: int = 64, repeats: int = 5,
                       clock: Callable[[], float] = time.perf_counter) -> tuple[float, ...]:
    """Time of a batch-1 step verifying k drafts, relative to a plain step, on this machine: what
    speculation trades against (small matrix products cost far more than a matrix-vector one on CPUs).
    With a draft model, the k draft forwards that propose the drafts are timed as part of the step.

    The k are timed in turn within each round, so a busy neighbour slows them alike, and each takes its
    median round; no k counts as cheaper than a plain step. Costs need not grow with k: BLAS picks
    different kernels for different row counts (here 3 drafts measured cheaper than 2). `clock` is
    time.perf_counter; a test may count work with it instead.
    """
    scratch = blocks.allocate(context + k_max + 1)
    try:
        with draft.calibration(context) if draft is not None else nullcontext(lambda k: None) as propose:
            items = [DecodeItem(0, context, scratch, (0,) * k) for k in range(k_max + 1)]
            propose(k_max)
            runner.run_decode([items[-1]])  # warm-up
            samples = [[] for _ in items]
            for _ in range(repeats):
                for k, item in enumerate(items):
                    started = clock()
                    propose(k)
                    runner.run_decode([item])
                    samples[k].append(clock() - started)
    finally:
        blocks.free(scratch)
    medians = [sorted(times)[len(times) // 2] for times in samples]
    return tuple(max(median / medians[0], 1.0) for median in medians)
