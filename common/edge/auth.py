"""API keys at the public gateway edge: who may call, and how much. Pure Python; the servicer maps the errors.

One request's life here: the servicer hands the `authorization` metadata to `ApiKeys.authenticate`, which
finds the key's record (or raises Unauthenticated) -> `ApiKeys.admit` takes one of the key's concurrent slots
and charges the request's estimated tokens to the key's token bucket (or raises RateLimited, a
ResourceExhausted that says when to retry) -> the request runs -> `Admission.release(tokens_used)` frees the
slot and corrects the charge to the tokens the request really used.

Hash scheme. The key file holds `NAME sha256$<hex> [max_concurrent=N] [tokens_per_minute=N]` per line: the
SHA-256 of the secret, never the secret. Secrets are made by `pdserve keys` only: `pdk_` + 32 random bytes
(urlsafe base64), as GitHub and Stripe tokens are. A 256-bit random secret cannot be found from its hash by
guessing, so a slow salted hash (scrypt, n=2**14, r=8, p=1) would add nothing but cost: it measured 54 ms per
request on this project's CPUs, against 0.6 us for SHA-256, and the gateway checks a key on every request.
The file cannot tell a hash of a weak, hand-made secret from a good one, which is why keys must come from
`pdserve keys`. Because the hash is unsalted, a lookup is one hash and one dictionary probe; the probe's
timing can reveal at most a prefix of a stored hash, which does not help find any secret.

Secrets never reach logs, traces or metrics: no message here quotes a presented key, `KeyRecord` shows its
name only, and names that look like secrets are refused. Off by default: `ApiKeys.disabled()` lets every
request in, unlimited, as the key "anonymous"."""

import functools
import hashlib
import re
import secrets
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from common.basics.errors import RateLimited, Unauthenticated

SECRET_PREFIX = "pdk_"
_SCHEME = "sha256$"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_DIGEST = re.compile(r"[0-9a-f]{64}")
_SEND_KEY = "send `authorization: Bearer <key>` metadata"


@dataclass(frozen=True)
class KeyLimits:
    """Per key; None is unlimited."""

    max_concurrent: int | None = None
    tokens_per_minute: int | None = None

    def __post_init__(self) -> None:
        for name, value in (("max_concurrent", self.max_concurrent), ("tokens_per_minute", self.tokens_per_minute)):
            if value is not None and value < 1:
                raise ValueError(f"{name} must be at least 1, got {value}")


@dataclass(frozen=True, repr=False)
class KeyRecord:
    """One line of the key file. The name is safe to log and to label metrics with; the digest is not shown."""

    name: str
    digest: str  # hex SHA-256 of the secret
    limits: KeyLimits = field(default_factory=KeyLimits)

    def __repr__(self) -> str:
        return f"KeyRecord(name={self.name!r})"

    def line(self) -> str:
        """The record as a line of the key file."""
        options = [f"{option}={value}" for option, value in (("max_concurrent", self.limits.max_concurrent),
                                                              ("tokens_per_minute", self.limits.tokens_per_minute))
                   if value is not None]
        return " ".join([self.name, _SCHEME + self.digest, *options])


ANONYMOUS = KeyRecord("anonymous", "")


def new_secret() -> str:
    return SECRET_PREFIX + secrets.token_urlsafe(32)


def digest_of(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def check_name(name: str) -> str:
    """A key's name goes into logs and metric labels: a short token, and never something shaped like a secret."""
    if not _NAME.fullmatch(name):
        raise ValueError("a key name is 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit")
    if name.startswith(SECRET_PREFIX):
        raise ValueError(f"a key name must not start with {SECRET_PREFIX!r}: that is how secrets start")
    return name


def parse_line(line: str) -> KeyRecord:
    """One non-comment line of the key file. Errors never quote the hash field: a pasted secret may be there."""
    fields = line.split()
    if len(fields) < 2:
        raise ValueError("expected `NAME sha256$<hex> [max_concurrent=N] [tokens_per_minute=N]`")
    name, hashed, *options = fields
    check_name(name)
    digest = hashed.removeprefix(_SCHEME)
    if not hashed.startswith(_SCHEME) or not _DIGEST.fullmatch(digest):
        raise ValueError(f"key {name!r}: the second field must be `sha256$` and 64 hex digits; make keys with "
                         "`pdserve keys`")
    return KeyRecord(name, digest, _parse_limits(name, options))


def _parse_limits(name: str, options: list[str]) -> KeyLimits:
    values: dict[str, int] = {}
    for option in options:
        key, _, value = option.partition("=")
        if key not in ("max_concurrent", "tokens_per_minute") or not value.isdigit() or key in values:
            raise ValueError(f"key {name!r}: options are max_concurrent=N and tokens_per_minute=N, once each")
        values[key] = int(value)
    return KeyLimits(**values)


def authorization_of(metadata: Iterable[tuple[str, str | bytes]]) -> str | None:
    """The `authorization` value of gRPC invocation metadata (keys arrive lower-case), or None."""
    for key, value in metadata:
        if key == "authorization":
            return value.decode(errors="replace") if isinstance(value, bytes) else value
    return None


class TokenBucket:
    """Tokens per minute, refilled continuously up to one minute's worth. Not thread-safe: ApiKeys locks it."""

    def __init__(self, tokens_per_minute: int, now: float) -> None:
        self.capacity = float(tokens_per_minute)
        self.rate_per_s = tokens_per_minute / 60.0
        self.level = self.capacity
        self.updated_at = now

    def refill(self, now: float) -> None:
        self.level = min(self.capacity, self.level + self.rate_per_s * max(0.0, now - self.updated_at))
        self.updated_at = max(self.updated_at, now)

    def wait_s(self, tokens: int) -> float:
        """Seconds until `tokens` can be taken (0 now); call after refill."""
        return max(0.0, (tokens - self.level) / self.rate_per_s)

    def adjust(self, tokens: float) -> None:
        """Give back (positive) or charge more (negative); a level below zero delays later requests. Capping
        without refilling first is exact: a bucket full now stays full whenever it is next refilled."""
        self.level = min(self.capacity, self.level + tokens)


@dataclass
class _KeyState:
    in_flight: int = 0
    bucket: TokenBucket | None = None


class Admission:
    """A request let in under a key: release it once, with the tokens it used. As a context manager, leaving
    without a release keeps the estimate charged."""

    def __init__(self, release: Callable[[int], None], estimated_tokens: int) -> None:
        self._release = release
        self.estimated_tokens = estimated_tokens
        self._released = False
        self._lock = threading.Lock()

    def release(self, tokens_used: int) -> None:
        with self._lock:
            if self._released:
                return
            self._released = True
        self._release(tokens_used)

    def __enter__(self) -> "Admission":
        return self

    def __exit__(self, *_exc_info: object) -> None:
        self.release(self.estimated_tokens)


def _ignore(_tokens_used: int) -> None:
    pass


class ApiKeys:
    """The gateway's keys and each key's live usage (requests in flight, its token bucket). Thread-safe."""

    def __init__(self, records: Iterable[KeyRecord], enabled: bool = True,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.enabled = enabled
        self._clock = clock
        self._by_digest: dict[str, KeyRecord] = {}
        for record in records:
            if record.digest in self._by_digest:
                raise ValueError(f"keys {self._by_digest[record.digest].name!r} and {record.name!r} are the same key")
            if any(other.name == record.name for other in self._by_digest.values()):
                raise ValueError(f"two keys are named {record.name!r}")
            self._by_digest[record.digest] = record
        self._states: dict[str, _KeyState] = {}
        self._lock = threading.Lock()

    @classmethod
    def disabled(cls) -> "ApiKeys":
        """No key file: every request is let in as "anonymous", unlimited (local use)."""
        return cls([], enabled=False)

    @classmethod
    def load(cls, path: Path, clock: Callable[[], float] = time.monotonic) -> "ApiKeys":
        """The keys of a key file; `#` starts a comment. Errors name the file and line."""
        records = []
        for number, text in enumerate(path.read_text().splitlines(), start=1):
            line = text.split("#", 1)[0].strip()
            if not line:
                continue
            try:
                records.append(parse_line(line))
            except ValueError as error:
                raise ValueError(f"{path}:{number}: {error}") from None
        try:
            return cls(records, clock=clock)
        except ValueError as error:
            raise ValueError(f"{path}: {error}") from None

    @property
    def names(self) -> list[str]:
        return [record.name for record in self._by_digest.values()]

    def authenticate(self, authorization: str | None) -> KeyRecord:
        """The record of the key in an `authorization: Bearer <key>` value."""
        if not self.enabled:
            return ANONYMOUS
        if authorization is None or not authorization.strip():
            raise Unauthenticated(f"this gateway needs an API key: {_SEND_KEY}")
        scheme, _, secret = authorization.strip().partition(" ")
        secret = secret.strip()
        if scheme.lower() != "bearer" or not secret or " " in secret:
            raise Unauthenticated(f"the authorization metadata is not `Bearer <key>`: {_SEND_KEY}")
        record = self._by_digest.get(digest_of(secret))
        if record is None:
            raise Unauthenticated("the key is not known to this gateway: ask its operator for one "
                                  "(made with `pdserve keys`)")
        return record

    def admit(self, record: KeyRecord, estimated_tokens: int, now: float | None = None) -> Admission:
        """Let one request in under the key's limits, charging `estimated_tokens` (prompt + max new tokens)."""
        now = self._clock() if now is None else now
        if not self.enabled:
            return Admission(_ignore, estimated_tokens)
        with self._lock:
            state = self._state(record, now)
            self._check(record, state, estimated_tokens, now)
            state.in_flight += 1
            if state.bucket is not None:
                state.bucket.adjust(-estimated_tokens)
        return Admission(functools.partial(self._release, state, estimated_tokens), estimated_tokens)

    def in_flight(self, record: KeyRecord) -> int:
        with self._lock:
            state = self._states.get(record.name)
            return 0 if state is None else state.in_flight

    def _state(self, record: KeyRecord, now: float) -> _KeyState:
        state = self._states.get(record.name)
        if state is None:
            rate = record.limits.tokens_per_minute
            state = self._states[record.name] = _KeyState(bucket=None if rate is None else TokenBucket(rate, now))
        return state

    @staticmethod
    def _check(record: KeyRecord, state: _KeyState, estimated_tokens: int, now: float) -> None:
        limit = record.limits.max_concurrent
        if limit is not None and state.in_flight >= limit:
            raise RateLimited(f"key {record.name!r} has {limit} requests in flight, its limit: retry when one "
                              "finishes", retry_after_s=None)
        bucket = state.bucket
        if bucket is None:
            return
        if estimated_tokens > bucket.capacity:
            raise RateLimited(f"the request may use {estimated_tokens} tokens, more than key {record.name!r} may "
                              f"use per minute ({int(bucket.capacity)}): lower max_tokens", retry_after_s=None)
        bucket.refill(now)
        wait_s = bucket.wait_s(estimated_tokens)
        if wait_s > 0:
            raise RateLimited(f"key {record.name!r} is over its {int(bucket.capacity)} tokens per minute: retry "
                              f"in {wait_s:.1f} s", retry_after_s=wait_s)

    def _release(self, state: _KeyState, estimated_tokens: int, tokens_used: int) -> None:
        with self._lock:
            state.in_flight -= 1
            if state.bucket is not None:
                state.bucket.adjust(estimated_tokens - max(0, tokens_used))
