"""Router: picks the decode and prefill instances of a request by the load this gateway sent them.

Decode instances are tried least-loaded first (a full one answers RESOURCE_EXHAUSTED and the next is
tried); the prefill instance is the one with the fewest prompt tokens in flight.
"""

import threading
from collections.abc import Iterator
from contextlib import contextmanager


class Router:
    def __init__(self, prefill_addresses: tuple[str, ...], decode_addresses: tuple[str, ...]) -> None:
        self._prefill_tokens = dict.fromkeys(prefill_addresses, 0)
        self._decode_requests = dict.fromkeys(decode_addresses, 0)
        self._lock = threading.Lock()

    def decode_order(self) -> list[str]:
        with self._lock:
            return sorted(self._decode_requests, key=self._decode_requests.__getitem__)

    def pick_prefill(self) -> str:
        with self._lock:
            return min(self._prefill_tokens, key=self._prefill_tokens.__getitem__)

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
