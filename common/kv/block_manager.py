"""BlockManager: which KV blocks are free, which are reserved (with a lease), which are in use, and which hold
a cached prefix. No torch.

Allocation hands out the lowest free ids, as one run of consecutive blocks when one is free: a sequence
whose blocks are a run is read in place by CPU decode attention (common/model/decode_attention.py), where
scattered blocks are gathered into a copy first, every layer of every step.

A reservation holds blocks for a request whose KV has not started decoding yet. Its lease is renewed while
its KV keeps arriving (`renew`); if nobody claims it before its lease ends, `expire` frees its blocks: a lost
gateway or prefill tier cannot leak memory, and a long prompt whose KV is still flowing is never cut off.

Prefix cache (when built with a prefix root: common/kv/prefix.py). A full block whose KV is complete is
`register`ed under its chained hash, with its token ids. Blocks are reference-counted: `match` finds the
leading blocks of a prompt that are cached, confirming each by its token ids (a hash collision is counted and
never served), and takes a reference on each; `free` drops one. A cached block nobody references is not
free but evictable: it stays cached, and is handed out again (its cache entry dropped) only when no free block
is left, least recently used first. Capacity (`num_free`) counts both.
"""

import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

from common.kv.prefix import ChainHash, block_hashes, chain_hash

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
    num_cached_tokens: int = 0  # leading tokens whose blocks came from the prefix cache


@dataclass(frozen=True)
class CachedBlock:
    hash: int
    token_ids: tuple[int, ...]


@dataclass
class PrefixCounts:
    query_tokens: int = 0  # prompt tokens looked up
    hit_tokens: int = 0  # of those, found cached
    collisions: int = 0  # hashes found whose token ids differed: not served


@dataclass(frozen=True)
class PrefixSummary:
    """What the prefix cache holds, for the gateway's routing (the GetCacheSummary RPC), and the load beside it."""

    version: int
    hashes: list[int] | None  # None: unchanged since the version the caller holds
    num_blocks_total: int
    num_blocks_free: int
    prefix_caching: bool
    num_requests: int
    num_queued_tokens: int


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, *, prefix_root: int | None = None,
                 hash_fn: ChainHash = chain_hash) -> None:
        """prefix_root: the root of the block hashes (common/kv/prefix.root_hash of the KV layout's fingerprint);
        None turns the prefix cache off. hash_fn: the chain hash (tests force collisions with it)."""
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need at least one block of at least one token, got {num_blocks} x {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.prefix_root = prefix_root
        self._hash_fn = hash_fn
        self._free: list[int] = list(range(num_blocks))  # ascending; never cached, or their entry dropped
        self._refs = [0] * num_blocks
        self._reservations: dict[str, Reservation] = {}
        self._cached: dict[int, int] = {}  # hash -> block id
        self._entry: dict[int, CachedBlock] = {}  # block id -> what it caches
        self._evictable: OrderedDict[int, None] = OrderedDict()  # cached, unreferenced; least recently used first
        # Changes whenever the set of cached hashes changes; starts from the clock, so a restarted instance is
        # never taken for the one a gateway knew.
        self.cache_version = time.time_ns()
        self.prefix_counts = PrefixCounts()

    @property
    def prefix_caching(self) -> bool:
        return self.prefix_root is not None

    @property
    def num_free(self) -> int:
        """Blocks an allocation may take: free ones and evictable cached ones."""
        return len(self._free) + len(self._evictable)

    @property
    def num_cached(self) -> int:
        """Blocks holding a cached prefix, referenced or not."""
        return len(self._entry)

    def summary(self, known_version: int, *, num_requests: int, num_queued_tokens: int) -> PrefixSummary:
        hashes = None if known_version == self.cache_version else list(self._cached)
        return PrefixSummary(self.cache_version, hashes, self.num_blocks, self.num_free, self.prefix_caching,
                             num_requests, num_queued_tokens)

    @property
    def num_reserved(self) -> int:
        return len(self._reservations)

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def allocate(self, num_tokens: int) -> list[int]:
        return self.allocate_blocks(self.blocks_needed(num_tokens), f"{num_tokens} tokens")

    def allocate_blocks(self, needed: int, what: str = "") -> list[int]:
        """`needed` blocks, each referenced once: free ones first, then evicted cached ones, oldest use first."""
        if needed > self.num_free:
            raise OutOfBlocks(f"{what or 'a request'} need{'s' if not what else ''} {needed} KV blocks, "
                              f"{self.num_free} are free")
        from_free = min(needed, len(self._free))
        start = self._first_run(from_free) if from_free else 0
        start = 0 if start is None else start  # no run that long: the lowest ids, scattered
        taken = self._free[start:start + from_free]
        del self._free[start:start + from_free]
        taken += [self._evict() for _ in range(needed - from_free)]
        for block in taken:
            self._refs[block] = 1
        return taken

    def _evict(self) -> int:
        block, _ = self._evictable.popitem(last=False)
        del self._cached[self._entry.pop(block).hash]
        self.cache_version += 1
        return block

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
        """Drops one reference to each block; one nobody references is free again, or evictable if cached."""
        released = []
        for block in block_ids:
            assert self._refs[block] > 0, f"block {block} freed while not in use"
            self._refs[block] -= 1
            if self._refs[block]:
                continue
            if block in self._entry:
                self._evictable[block] = None  # most recently used last
            else:
                released.append(block)
        if released:
            self._free.extend(released)
            self._free.sort()  # two sorted runs: merged in linear time

    # The prefix cache.

    def prefix_hashes(self, token_ids: Sequence[int]) -> list[int]:
        """The names of token_ids' full blocks ([] with the prefix cache off)."""
        if self.prefix_root is None:
            return []
        return block_hashes(token_ids, self.block_size, self.prefix_root, self._hash_fn)

    def match(self, token_ids: Sequence[int], max_tokens: int | None = None) -> list[int]:
        """The cached blocks holding token_ids' leading full blocks (at most max_tokens tokens), each confirmed by
        its token ids and referenced once more: the caller frees them with the rest of its blocks."""
        if self.prefix_root is None:
            return []
        limit = len(token_ids) if max_tokens is None else min(max_tokens, len(token_ids))
        found: list[int] = []
        for index, digest in enumerate(self.prefix_hashes(token_ids[:limit - limit % self.block_size])):
            block = self._cached.get(digest)
            if block is None:
                break
            tokens = tuple(token_ids[index * self.block_size:(index + 1) * self.block_size])
            if self._entry[block].token_ids != tokens:
                self.prefix_counts.collisions += 1
                break
            found.append(block)
        for block in found:
            if self._refs[block] == 0:
                del self._evictable[block]
            self._refs[block] += 1
        self.prefix_counts.query_tokens += len(token_ids)
        self.prefix_counts.hit_tokens += len(found) * self.block_size
        return found

    def register(self, block_ids: Sequence[int], token_ids: Sequence[int]) -> None:
        """Caches the full blocks of a sequence whose KV for token_ids is complete in block_ids (in order). A
        block whose name is cached already (the same prefix computed twice, or a collision) stays uncached."""
        if self.prefix_root is None:
            return
        for index, digest in enumerate(self.prefix_hashes(token_ids[:len(block_ids) * self.block_size])):
            block = block_ids[index]
            if block in self._entry or digest in self._cached:
                continue
            self._cached[digest] = block
            self._entry[block] = CachedBlock(digest, tuple(token_ids[index * self.block_size:
                                                                     (index + 1) * self.block_size]))
            self.cache_version += 1

    def reserve(self, handle: str, num_tokens: int, *, lease_s: float, now: float,
                prompt_ids: Sequence[int] = (), max_cached_tokens: int | None = None) -> Reservation:
        """Blocks for num_tokens tokens; the leading full blocks of prompt_ids (at most max_cached_tokens tokens)
        come from the prefix cache where it holds them (their KV is there already: reservation.num_cached_tokens)."""
        if handle in self._reservations:
            raise ValueError(f"reservation {handle!r} exists already")
        cached = self.match(prompt_ids, max_cached_tokens) if prompt_ids else []
        try:
            rest = self.allocate_blocks(self.blocks_needed(num_tokens) - len(cached), f"{num_tokens} tokens")
        except OutOfBlocks:
            self.free(cached)
            raise
        reservation = Reservation(handle, cached + rest, lease_s, now + lease_s, len(cached) * self.block_size)
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

    def expired(self, now: float) -> list[Reservation]:
        """The reservations whose lease has ended (still held: the caller releases or claims each)."""
        return [r for r in self._reservations.values() if r.expires_at <= now]

    def expire(self, now: float) -> list[Reservation]:
        """Frees every reservation whose lease has ended; returns them."""
        expired = self.expired(now)
        for reservation in expired:
            self.release(reservation.handle)
        return expired
