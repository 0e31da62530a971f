"""Fleet: the instances behind the gateway's tier lists, followed as they come and go.

Each entry of --prefill / --decode is a static host:port or a DNS name (common/edge/discovery.py). At start every
entry is resolved once; then every interval_s again, and each instance that appeared is handed to `on_add`, each
that disappeared to `on_remove`. An instance that appears is not in rotation until its health check answers
SERVING (gateway/membership.py); one that disappears leaves rotation at once, and the calls in flight to it go
on (a Kubernetes pod leaves its Service's records when it stops being ready: draining, its streams finish). A
name that fails to resolve keeps the instances it had: a DNS hiccup must not empty a tier.
"""

import logging
import threading
from collections.abc import Callable

from common.edge.discovery import Instance, Target, parse_target, resolve

_log = logging.getLogger(__name__)
TIERS = ("prefill", "decode")


class Fleet:
    def __init__(self, targets: dict[str, tuple[str, ...]], interval_s: float,
                 resolver: Callable[[Target], list[Instance] | None] = resolve) -> None:
        self.targets = {tier: [parse_target(t) for t in targets[tier]] for tier in TIERS}
        self.interval_s = interval_s
        self._resolve = resolver
        self._known: dict[str, list[Instance]] = {}  # by target text: what it last resolved to
        self.instances: dict[str, dict[str, Instance]] = {tier: {} for tier in TIERS}  # tier -> address -> instance
        self.on_add: Callable[[str, Instance], None] = lambda tier, instance: None
        self.on_remove: Callable[[str, str], None] = lambda tier, address: None
        self._stop = threading.Event()

    @property
    def follows_names(self) -> bool:
        return any(t.resolved for targets in self.targets.values() for t in targets)

    def resolve_now(self) -> None:
        """Resolves every entry and applies the differences (the first call finds every instance)."""
        for tier, targets in self.targets.items():
            found: dict[str, Instance] = {}
            for target in targets:
                instances = self._resolve(target)
                if instances is None:
                    _log.warning("%s did not resolve; keeping its %d instances", target.text,
                                 len(self._known.get(target.text, [])))
                    instances = self._known.get(target.text, [])
                self._known[target.text] = instances
                found |= {i.address: i for i in instances}
            self._apply(tier, found)

    def _apply(self, tier: str, found: dict[str, Instance]) -> None:
        held = self.instances[tier]
        added = [i for address, i in found.items() if address not in held]
        removed = [address for address in held if address not in found]
        self.instances[tier] = found
        for instance in added:
            _log.info("%s instance %s found", tier, instance.address)
            self.on_add(tier, instance)
        for address in removed:
            _log.info("%s instance %s gone from its name's records", tier, address)
            self.on_remove(tier, address)

    def addresses(self, tier: str) -> tuple[str, ...]:
        return tuple(self.instances[tier])

    def start(self) -> None:
        """Re-resolves every interval_s, when a tier list names a DNS name (static lists never change)."""
        if self.follows_names:
            threading.Thread(target=self._run, name="fleet", daemon=True).start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.resolve_now()
            except Exception:  # the thread must outlive any one failure, or the fleet stops being followed
                _log.exception("resolving the tier lists failed")
