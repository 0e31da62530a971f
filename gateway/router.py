"""Router: picks the decode and prefill instances of a request among those in rotation (Membership).

Decode instances are tried in order, cheapest first (a full one answers RESOURCE_EXHAUSTED and the next is
tried); the prefill instance is the cheapest one. Instances out of rotation (unhealthy, draining, or avoided by
the caller) are never picked; ties go to the instance configured first.

KV-aware (a PrefixIndex given and the prompt's token ids passed): the cost of an instance is Dynamo's,

    prefix_weight x (prompt blocks it does not hold) + its load in blocks,

where it holds the prompt's leading full blocks its last CacheSummary names (gateway/kv_index.py), and its load
is, for decode, the blocks its requests hold (running, waiting and reserved: a burst of reservations shows at
the next poll, before their KV lands), for prefill, the prompt tokens it has still to compute, in blocks. The
cost is computed only from what the instances reported, never from this gateway's own traffic, so gateways that
read the same summaries make the same choices (and one that restarts makes the same choices as before). Equal
costs (an idle fleet, a fresh prompt) are broken by a hash of the prompt, not by configured order: different
prompts spread over the instances, the same prompt goes to the same one, on every gateway. prefix_weight 0
routes by reported load alone.

Otherwise (no index, no prompt, or an instance in rotation that has not reported: just started, not answering,
or too old to be asked) the order is by the load this gateway sent: decode by the requests in flight on each,
prefill by the prompt tokens in flight. Reported and unknown loads cannot be weighed against each other, and
this never sends all the traffic to, or none to, an instance because nothing is known of it.
"""

import threading
import zlib
from array import array
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

from common.basics.errors import Unavailable
from gateway.kv_index import PrefixIndex, PromptBlocks, num_cached_blocks
from gateway.membership import Membership
from gateway.tiers import CacheSummary


def decode_load_blocks(summary: CacheSummary) -> float:
    """A decode instance's load: blocks held by its requests (running, waiting, reserved)."""
    return summary.num_queued_tokens


def prefill_load_blocks(summary: CacheSummary) -> float:
    """A prefill instance's load: prompt tokens still to compute, in blocks."""
    return summary.num_queued_tokens / summary.block_size


class Router:
    def __init__(self, prefill_addresses: tuple[str, ...], decode_addresses: tuple[str, ...],
                 membership: Membership | None = None, index: PrefixIndex | None = None,
                 prefix_weight: float = 1.0) -> None:
        self._prefill_tokens = dict.fromkeys(prefill_addresses, 0)
        self._decode_requests = dict.fromkeys(decode_addresses, 0)
        self.membership = membership  # None: every instance is in rotation
        self.index = index  # None: route by this gateway's own load
        self.prefix_weight = prefix_weight
        self._lock = threading.Lock()

    def decode_order(self, avoid: frozenset[str] = frozenset(), prompt_ids: Sequence[int] | None = None) -> list[str]:
        """Decode instances in rotation, cheapest first (ties in configured order)."""
        live = self._live("decode", self._decode_requests, avoid)
        costs = self._costs(live, prompt_ids, decode_load_blocks)
        if costs is not None:
            return sorted(live, key=costs.__getitem__)  # costs carry the prompt's tie-break
        with self._lock:
            return sorted(live, key=self._decode_requests.__getitem__)

    def pick_prefill(self, avoid: frozenset[str] = frozenset(), prompt_ids: Sequence[int] | None = None) -> str:
        """The cheapest prefill instance in rotation (ties: the first configured)."""
        live = self._live("prefill", self._prefill_tokens, avoid)
        if not live:
            raise Unavailable("no prefill instance is serving now; try again shortly")
        costs = self._costs(live, prompt_ids, prefill_load_blocks)
        if costs is not None:
            return min(live, key=costs.__getitem__)  # costs carry the prompt's tie-break
        with self._lock:
            return min(live, key=self._prefill_tokens.__getitem__)

    def add(self, tier: str, address: str) -> None:
        """A new instance (found by a DNS name); it is picked once Membership has it in rotation."""
        with self._lock:
            (self._prefill_tokens if tier == "prefill" else self._decode_requests).setdefault(address, 0)

    def expected_cached_blocks(self, address: str, prompt_ids: Sequence[int]) -> int:
        """Leading full blocks of the prompt the instance holds, as its last summary says (0 without an index)."""
        return 0 if self.index is None else self.index.num_cached_blocks(address, prompt_ids)

    def recheck(self, address: str) -> bool:
        """Asks an instance for its health now (a call to it failed); returns whether it stays in rotation."""
        return True if self.membership is None else self.membership.recheck(address)

    def _costs(self, live: list[str], prompt_ids: Sequence[int] | None,
               load_blocks: Callable[[CacheSummary], float]) -> dict[str, tuple[float, int]] | None:
        """Each live instance's (cost, tie-break) from its last summary; None (route by own load) when KV-aware
        routing is off for this choice: no index, no prompt, or a live instance without a summary."""
        if self.index is None or prompt_ids is None:
            return None
        prompt, costs = PromptBlocks(prompt_ids), {}
        turn = zlib.crc32(array("I", prompt_ids).tobytes())  # the same on every gateway
        for position, address in enumerate(live):
            summary = self.index.summary(address)
            if summary is None:
                return None
            uncached = prompt.num_blocks(summary.block_size) - num_cached_blocks(summary, prompt)
            costs[address] = (self.prefix_weight * uncached + load_blocks(summary), (position + turn) % len(live))
        return costs

    def _live(self, tier: str, known: dict[str, int], avoid: frozenset[str]) -> list[str]:
        if self.membership is None:
            up = set(known)
        else:
            if not self.membership.up(tier):  # none in rotation: one may have come back since the last round
                self.membership.refresh(self.membership.tiers[tier])
            up = set(self.membership.up(tier))
        return [address for address in known if address in up and address not in avoid]

    @contextmanager
    def decoding(self, address: str) -> Iterator[None]:
        with self._lock:
            self._decode_requests[address] += 1
        try:
            yield
        finally:
            with self._lock:
                self._decode_requests[address] -= 1

    @contextmanager
    def prefilling(self, address: str, num_tokens: int) -> Iterator[None]:
        with self._lock:
            self._prefill_tokens[address] += num_tokens
        try:
            yield
        finally:
            with self._lock:
                self._prefill_tokens[address] -= num_tokens
