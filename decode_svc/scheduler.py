"""Scheduler: decides each decode step which sequences run. No torch, no locks: plain data in, a
frozen StepPlan out.

Continuous batching: every step drops cancelled sequences, keeps every running one, and admits
waiting sequences whose KV has landed (oldest first) while the batch has room. Blocks for a sequence's
whole budget were reserved before its KV was sent, so a plan never runs out of memory mid-sequence.
"""

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class SeqView:
    handle: str
    kv_ready: bool
    cancelled: bool


@dataclass(frozen=True)
class StepPlan:
    admit: tuple[str, ...]  # waiting -> running this step
    run: tuple[str, ...]  # the batch of this step, running order
    drop: tuple[str, ...]  # cancelled: free their blocks, close their streams


class Scheduler:
    def __init__(self, max_batch_size: int) -> None:
        self.max_batch_size = max_batch_size

    def plan(self, waiting: Sequence[SeqView], running: Sequence[SeqView]) -> StepPlan:
        drop = tuple(s.handle for s in (*waiting, *running) if s.cancelled)
        keep = tuple(s.handle for s in running if not s.cancelled)
        room = max(self.max_batch_size - len(keep), 0)
        admit = tuple(s.handle for s in waiting if s.kv_ready and not s.cancelled)[:room]
        return StepPlan(admit=admit, run=keep + admit, drop=drop)
