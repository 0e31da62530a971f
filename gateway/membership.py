"""Membership: which prefill and decode instances can take work now.

Each instance is asked for its health every interval_s, each from its own thread (a frozen instance only holds
up its own checks). One that answers NOT_SERVING (a draining tier) or cannot be reached (a dead one) is out of
rotation at once, one that leaves MISSES_OUT checks in a row unanswered (a frozen one) too; each is back once it
answers SERVING. A call that fails as if its instance were gone
asks for a check at once (`recheck`), so the next request already avoids it; a request that finds none of a
tier in rotation has them all checked at once (`refresh`) before it is turned away. The gateway is SERVING while at
least one prefill and one decode instance are in rotation.
"""

import logging
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

_log = logging.getLogger(__name__)
# Checks in a row an instance may leave unanswered (timed out) before it leaves rotation: a loaded machine can
# delay one answer past its timeout; a frozen instance misses every one. Answering NOT_SERVING, or refusing the
# connection (dead), takes it out at once.
MISSES_OUT = 3


class Membership:
    def __init__(self, prefill: tuple[str, ...], decode: tuple[str, ...], check: Callable[[str], bool | None],
                 on_change: Callable[[bool], None] = lambda serving: None, interval_s: float = 1.0,
                 slots: Callable[[str], int | None] = lambda address: None,
                 on_instance: Callable[[str, bool], None] = lambda address, up: None) -> None:
        self.tiers = {"prefill": prefill, "decode": decode}
        self._on_instance = on_instance  # told each time an instance goes out of or back into rotation
        self._check, self._on_change, self._interval_s, self._slots = check, on_change, interval_s, slots
        self._up: dict[str, bool] = dict.fromkeys((*prefill, *decode), False)
        self._misses: dict[str, int] = dict.fromkeys(self._up, 0)  # unanswered checks in a row
        self._decode_slots: dict[str, int] = {}  # each decode instance's batch size, asked once it is up
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._started = False

    def up(self, tier: str) -> list[str]:
        """The tier's instances in rotation, in configured order (then in order found)."""
        with self._lock:
            return [address for address in self.tiers[tier] if self._up.get(address)]

    def decode_slots(self) -> int:
        """Batch slots of the decode instances in rotation (what the gateway admits against)."""
        return sum(self._decode_slots.get(address, 0) for address in self.up("decode"))

    def can_serve(self) -> bool:
        return bool(self.up("prefill") and self.up("decode"))

    def recheck(self, address: str) -> bool:
        """Checks one instance now (after a failed call); returns whether it answered SERVING (a retry avoids
        it otherwise, even while a slow answer leaves it in rotation)."""
        serving = self._check(address)
        self._record(address, serving)
        return serving is True

    def refresh(self, addresses: tuple[str, ...]) -> None:
        """Checks these instances now, side by side (when a tier seems to have none in rotation: one may have
        just come back)."""
        with ThreadPoolExecutor(max_workers=len(addresses)) as pool:
            for address, serving in zip(addresses, pool.map(self._check, addresses)):
                self._record(address, serving)

    def start(self) -> None:
        """One round of checks at once (so a gateway starts knowing its tiers), then one thread per instance."""
        self.refresh(tuple(self._up))
        self._on_change(self.can_serve())
        self._started = True
        for address in list(self._up):
            self._follow(address)

    def stop(self) -> None:
        self._stop.set()

    def add(self, tier: str, address: str) -> None:
        """A new instance (found by a DNS name): out of rotation until it answers SERVING, checked from now on."""
        with self._lock:
            if address in self._up:
                return
            self.tiers[tier] = (*self.tiers[tier], address)
            self._up[address], self._misses[address] = False, 0
        self._on_instance(address, False)
        if self._started:
            self._follow(address)

    def remove(self, address: str) -> None:
        """An instance gone from its name's records: out of rotation at once, no longer checked."""
        with self._lock:
            was_up = self._up.pop(address, False)
            self._misses.pop(address, None)
            self._decode_slots.pop(address, None)
            self.tiers = {tier: tuple(a for a in addresses if a != address) for tier, addresses in self.tiers.items()}
        if was_up:
            self._on_instance(address, False)
            self._on_change(self.can_serve())

    def _follow(self, address: str) -> None:
        threading.Thread(target=self._watch, args=(address,), name=f"health {address}", daemon=True).start()

    def _watch(self, address: str) -> None:
        while not self._stop.wait(self._interval_s) and address in self._up:
            self._record(address, self._check(address))

    def _record(self, address: str, serving: bool | None) -> None:
        """serving: True (SERVING), False (answered otherwise, or unreachable), None (no answer in time)."""
        if serving and address in self.tiers["decode"] and address not in self._decode_slots:
            slots = self._slots(address)
            if slots:
                self._decode_slots[address] = slots
        with self._lock:
            if address not in self._up:
                return  # removed meanwhile
            self._misses[address] = self._misses[address] + 1 if serving is None else 0
            up = serving if serving is not None else self._up[address] and self._misses[address] < MISSES_OUT
            changed = self._up[address] != up
            self._up[address] = up
        if changed:
            _log.info("%s %s rotation", address, "back in" if up else "out of")
            self._on_instance(address, up)
            self._on_change(self.can_serve())
