"""BlockManager: which KV blocks are free, which are reserved (with a lease), which are in use. No torch.

Allocation hands out the lowest free ids, as one run of consecutive blocks when one is free: a sequence
whose blocks are a run is read in place by CPU decode attention (common/model/decode_attention.py), where
scattered blocks are gathered into a copy first, every layer of every step.

A reservation holds blocks for a request whose KV has not started decoding yet. Its lease is renewed while
its KV keeps arriving (`renew`); if nobody claims it before its lease ends, `expire` frees its blocks: a lost
gateway or prefill tier cannot leak memory, and a long prompt whose KV is still flowing is never cut off.
"""

from dataclasses import dataclass

# Windows of the free list _first_run looks at before settling for scattered ids: ~0.1 ms of Python.
MAX_RUN_WINDOWS = 512


class OutOfBlocks(Exception):
    """Not enough free blocks for a request."""


@dataclass
class Reservation:
    handle: str
    block_ids: list[int]
    lease_s: float
    expires_at: float  # monotonic seconds


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need at least one block of at least one token, got {num_blocks} x {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: list[int] = list(range(num_blocks))  # ascending
        self._reservations: dict[str, Reservation] = {}

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_reserved(self) -> int:
        return len(self._reservations)

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def allocate(self, num_tokens: int) -> list[int]:
        needed = self.blocks_needed(num_tokens)
        if needed > len(self._free):
            raise OutOfBlocks(f"{num_tokens} tokens need {needed} KV blocks, {len(self._free)} are free")
        start = self._first_run(needed)
        start = 0 if start is None else start  # no run that long: the lowest ids, scattered
        taken = self._free[start:start + needed]
        del self._free[start:start + needed]
        return taken

    def _first_run(self, length: int) -> int | None:
        """Index into the free list of its first `length` consecutive ids, or None. A window with a gap moves
        on past its last gap; after MAX_RUN_WINDOWS windows the search gives up (a bounded cost per request
        however fragmented a large pool is)."""
        free, i = self._free, 0
        for _ in range(MAX_RUN_WINDOWS):
            if i + length > len(free):
                return None
            end = i + length - 1
            if free[end] - free[i] == length - 1:  # ascending and distinct: consecutive
                return i
            while free[end] - free[end - 1] == 1:  # back to the window's last gap
                end -= 1
            i = end
        return None

    def free(self, block_ids: list[int]) -> None:
        self._free.extend(block_ids)
        self._free.sort()  # two sorted runs: merged in linear time

    def reserve(self, handle: str, num_tokens: int, *, lease_s: float, now: float) -> Reservation:
        if handle in self._reservations:
            raise ValueError(f"reservation {handle!r} exists already")
        reservation = Reservation(handle, self.allocate(num_tokens), lease_s, now + lease_s)
        self._reservations[handle] = reservation
        return reservation

    def renew(self, handle: str, now: float) -> None:
        """Progress on the reservation: its lease runs a full term again from now."""
        reservation = self._reservations[handle]
        reservation.expires_at = max(reservation.expires_at, now + reservation.lease_s)

    def get(self, handle: str) -> Reservation | None:
        return self._reservations.get(handle)

    def claim(self, handle: str) -> list[int]:
        """Ends the lease: the caller owns the blocks now and frees them with `free`."""
        return self._reservations.pop(handle).block_ids

    def release(self, handle: str) -> bool:
        reservation = self._reservations.pop(handle, None)
        if reservation is None:
            return False
        self.free(reservation.block_ids)
        return True

    def expire(self, now: float) -> list[Reservation]:
        """Frees every reservation whose lease has ended; returns them."""
        expired = [r for r in self._reservations.values() if r.expires_at <= now]
        for reservation in expired:
            self.release(reservation.handle)
        return expired
