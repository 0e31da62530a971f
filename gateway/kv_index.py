"""PrefixIndex: what each prefill and decode instance holds in its prefix cache, and its load, as the instance
last reported it. The Router (gateway/router.py) reads it to send a prompt where its leading blocks already are.

Every interval_s each instance is asked for its CacheSummary, each from its own thread (a frozen instance only
holds up its own polls), naming the version of its set already held: an instance whose cache has not changed
since answers `unchanged` and the held set stands; otherwise it sends its whole set of block names. The first
ask names version 0, which no tier holds (versions start from the clock, so a restarted instance is never taken
for the one known before). An instance that does not answer holds nothing here until it answers again, and then
sends a whole set: sending a prompt to an instance for a prefix it may have lost costs a full prefill, sending
it elsewhere only a missed reuse.

A prompt's blocks are named as the tiers name them (common/kv/prefix.py): chained hashes from the instance's
fingerprint, block_size tokens each. An instance holds a prompt's first k blocks when the names of blocks
0..k-1 are all in its set. Names are only a guess (64 bits can collide; the cache may have changed since the
poll): the tier confirms a hit by the tokens themselves.
"""

import logging
import math
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from itertools import takewhile

from common.kv.prefix import block_hashes, root_hash
from gateway.tiers import CacheSummary

_log = logging.getLogger(__name__)

# (address, known_version) -> the instance's summary, or None when it does not answer (GrpcTiers.cache_summary)
Summarize = Callable[[str, int], CacheSummary | None]


class PromptBlocks:
    """One prompt's block names, computed once per (fingerprint, block_size) asked for: the instances of a tier
    usually share both, so one routing decision hashes the prompt once."""

    def __init__(self, token_ids: Sequence[int]) -> None:
        self.token_ids = token_ids
        self._hashes: dict[tuple[str, int], list[int]] = {}

    def num_blocks(self, block_size: int) -> int:
        """Blocks the prompt's KV fills, a trailing partial one included."""
        return math.ceil(len(self.token_ids) / block_size)

    def hashes(self, fingerprint: str, block_size: int) -> list[int]:
        key = (fingerprint, block_size)
        if key not in self._hashes:
            self._hashes[key] = block_hashes(self.token_ids, block_size, root_hash(fingerprint))
        return self._hashes[key]


def num_cached_blocks(summary: CacheSummary, prompt: PromptBlocks) -> int:
    """Leading full blocks of the prompt the summary's instance holds (it stops at the first it does not)."""
    held = summary.block_hashes
    if not summary.prefix_caching or not held:
        return 0
    return sum(1 for _ in takewhile(held.__contains__, prompt.hashes(summary.fingerprint, summary.block_size)))


class PrefixIndex:
    def __init__(self, addresses: tuple[str, ...], summarize: Summarize, interval_s: float = 0.5) -> None:
        self.addresses = tuple(dict.fromkeys(addresses))
        self._summarize, self._interval_s = summarize, interval_s
        self._held: dict[str, CacheSummary] = {}  # by address; block_hashes is always a set here
        self._polling = {address: threading.Lock() for address in self.addresses}  # one poll of each at a time
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._warned: set[tuple[str, str]] = set()  # (address, fingerprint) whose layout mismatch was logged
        self._started = False

    def summary(self, address: str) -> CacheSummary | None:
        """The instance's last answer, its set of block names filled in; None while it does not answer."""
        with self._lock:
            return self._held.get(address)

    def num_cached_blocks(self, address: str, prompt: PromptBlocks | Sequence[int]) -> int:
        """Leading full blocks of the prompt the instance holds, as far as its last answer says (0 without one)."""
        summary = self.summary(address)
        if summary is None:
            return 0
        return num_cached_blocks(summary, prompt if isinstance(prompt, PromptBlocks) else PromptBlocks(prompt))

    def refresh(self) -> None:
        """Asks every instance now, side by side."""
        with ThreadPoolExecutor(max_workers=len(self.addresses)) as pool:
            list(pool.map(self._poll, self.addresses))

    def start(self) -> None:
        """One round at once (so the first requests already see the caches), then one thread per instance."""
        if self.addresses:
            self.refresh()
        self._started = True
        for address in self.addresses:
            self._follow(address)

    def stop(self) -> None:
        self._stop.set()

    def add(self, address: str) -> None:
        """A new instance (found by a DNS name): polled from now on."""
        with self._lock:
            if address in self._polling:
                return
            self._polling[address] = threading.Lock()
            self.addresses = (*self.addresses, address)
        if self._started:
            self._follow(address)

    def remove(self, address: str) -> None:
        """An instance gone: what it held is forgotten, and it is polled no more."""
        with self._lock:
            self._polling.pop(address, None)
            self._held.pop(address, None)
            self.addresses = tuple(a for a in self.addresses if a != address)

    def _follow(self, address: str) -> None:
        threading.Thread(target=self._watch, args=(address,), name=f"prefix index {address}", daemon=True).start()

    def _watch(self, address: str) -> None:
        while not self._stop.wait(self._interval_s) and address in self._polling:
            self._poll(address)

    def _poll(self, address: str) -> None:
        polling = self._polling.get(address)
        if polling is None:
            return  # removed
        with polling:
            held = self.summary(address)
            try:
                reply = self._summarize(address, held.version if held is not None else 0)
            except Exception:  # a poll thread that died would leave the instance's last set standing for good
                _log.exception("asking %s for its cache summary failed", address)
                reply = None
            merged = _merged(held, reply)
            with self._lock:
                if address not in self._polling:
                    return
                if merged is None:
                    self._held.pop(address, None)
                else:
                    self._held[address] = merged
        if (held is None) != (merged is None):
            _log.info("%s %s its prefix cache", address, "reports" if merged is not None else "no longer reports")
        if merged is not None:
            self._check_layout(address, merged.fingerprint)

    def _check_layout(self, address: str, fingerprint: str) -> None:
        """Logs, once, an instance whose KV layout differs from another's: a short prompt prefilled on decode never
        meets the prefill tier's own check, so the misconfiguration would show only on longer prompts."""
        with self._lock:
            others = {a: s.fingerprint for a, s in self._held.items() if a != address and s.fingerprint != fingerprint}
            if not others or (address, fingerprint) in self._warned:
                return
            self._warned.add((address, fingerprint))
        _log.warning("%s has another KV layout (fingerprint %s...) than %s: prefill and decode must run the same "
                     "model, --kv-dtype and --block-size", address, fingerprint[:12], ", ".join(sorted(others)))


def _merged(held: CacheSummary | None, reply: CacheSummary | None) -> CacheSummary | None:
    """The reply with its set of block names filled in from the held one when unchanged; None when there is
    nothing to hold (no answer, an unusable one, or an `unchanged` under another layout: the next ask, naming
    version 0, gets a whole set)."""
    if reply is None or reply.block_size < 1:
        return None
    if reply.block_hashes is not None:
        return reply
    if held is None:  # `unchanged` since version 0: a tier counting from 0 that has cached nothing yet
        return replace(reply, block_hashes=frozenset())
    if (held.fingerprint, held.block_size) != (reply.fingerprint, reply.block_size):
        return None
    return replace(reply, block_hashes=held.block_hashes)
