"""KvWrites: which reservations a NIXL writer (the prefill tier, --kv-transport nixl) is writing into, and the
fenced blocks of those that ended while it might still write. Callers hold the decode engine's lock.

A one-sided WRITE cannot be recalled: once the prefill tier has the block addresses, only the prefill tier knows
when its WRITEs stop. So a reservation that ends (lease, Release) while its writer's control stream is open is not
freed: its blocks are claimed from the BlockManager and fenced (held by nobody, reused by nobody) until the writer
commits or says it stopped; if the stream breaks with neither, until --nixl-fence-ms later (a writer whose process
died writes nothing more; one cut off by the network stops within its own transfer timeout). A broken stream of a
reservation that lives on marks it the same way: freed later, it is fenced for what is left of that time.
"""

import time
from dataclasses import dataclass

from common.kv.block_manager import BlockManager


@dataclass
class Fence:
    block_ids: list[int]
    reason: str  # why the reservation ended, for the writer's revocation
    until: float | None  # monotonic seconds; None while the writer's stream is open


class KvWrites:
    def __init__(self, blocks: BlockManager, fence_s: float) -> None:
        self.blocks = blocks
        self.fence_s = fence_s
        self.writers: dict[str, str] = {}  # handle -> the writer's NIXL agent, while its stream is open
        self._unconfirmed: dict[str, float] = {}  # handle -> until when a broken stream's writer may still write
        self.fences: dict[str, Fence] = {}

    def writing(self, handle: str) -> bool:
        """Whether a writer may still write into this live reservation's blocks."""
        return handle in self.writers or self._unconfirmed.get(handle, 0.0) > time.monotonic()

    def end(self, handle: str, reason: str) -> bool:
        """The reservation ends: True (its blocks fenced) when a writer may still write into them; False when the
        caller frees them as usual."""
        until = self._unconfirmed.pop(handle, None)
        if handle not in self.writers and (until is None or until <= time.monotonic()):
            return False
        self.fences[handle] = Fence(self.blocks.claim(handle), reason, None if handle in self.writers else until)
        return True

    def revoked(self, handle: str) -> str | None:
        fence = self.fences.get(handle)
        return None if fence is None else fence.reason

    def close(self, handle: str, confirmed: bool) -> None:
        """The writer's stream ended; confirmed: it committed or stopped (none of its WRITEs is in flight)."""
        if self.writers.pop(handle, None) is None:
            return
        fence = self.fences.get(handle)
        until = time.monotonic() + self.fence_s
        if fence is None:
            if not confirmed:
                self._unconfirmed[handle] = until
        elif confirmed:
            self.blocks.free(self.fences.pop(handle).block_ids)
        else:
            fence.until = until

    def sweep(self) -> None:
        """Frees the fences whose time is up."""
        now = time.monotonic()
        for handle in [h for h, f in self.fences.items() if f.until is not None and f.until <= now]:
            self.blocks.free(self.fences.pop(handle).block_ids)
        for handle in [h for h, until in self._unconfirmed.items() if until <= now]:
            del self._unconfirmed[handle]

    @property
    def num_fenced_blocks(self) -> int:
        return sum(len(f.block_ids) for f in self.fences.values())
