"""Router: picks the decode and prefill instances of a request among those in rotation (Membership), by the
load this gateway sent them.

Decode instances are tried least-loaded first (a full one answers RESOURCE_EXHAUSTED and the next is
tried); the prefill instance is the one with the fewest prompt tokens in flight. Instances out of rotation
(unhealthy, draining, or avoided by the caller) are never picked.
"""

import threading
from collections.abc import Iterator
from contextlib import contextmanager

from common.basics.errors import Unavailable
from gateway.membership import Membership


class Router:
    def __init__(self, prefill_addresses: tuple[str, ...], decode_addresses: tuple[str, ...],
                 membership: Membership | None = None) -> None:
        self._prefill_tokens = dict.fromkeys(prefill_addresses, 0)
        self._decode_requests = dict.fromkeys(decode_addresses, 0)
        self.membership = membership  # None: every instance is in rotation
        self._lock = threading.Lock()

    def decode_order(self, avoid: frozenset[str] = frozenset()) -> list[str]:
        """Decode instances in rotation, least loaded first (ties in configured order)."""
        live = self._live("decode", self._decode_requests, avoid)
        with self._lock:
            return sorted(live, key=self._decode_requests.__getitem__)

    def pick_prefill(self, avoid: frozenset[str] = frozenset()) -> str:
        live = self._live("prefill", self._prefill_tokens, avoid)
        if not live:
            raise Unavailable("no prefill instance is serving now; try again shortly")
        with self._lock:
            return min(live, key=self._prefill_tokens.__getitem__)

    def recheck(self, address: str) -> bool:
        """Asks an instance for its health now (a call to it failed); returns whether it stays in rotation."""
        return True if self.membership is None else self.membership.recheck(address)

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
