"""Typed errors of the service. common/edge/errors.py maps each to one gRPC status code, in one place."""


class PdserveError(Exception):
    """Base class; the message is what the caller sees, so it says what to change."""


class InvalidArgument(PdserveError):
    pass


class ResourceExhausted(PdserveError):
    pass


class RateLimited(ResourceExhausted):
    """Over a limit that clears with time (a key's tokens per minute, a full queue). retry_after_s: when trying
    again should succeed (sent to the client as grpc-retry-pushback-ms); None when no time can be promised."""

    def __init__(self, message: str, retry_after_s: float | None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class Unauthenticated(PdserveError):
    """The request carries no credential, or one this service does not know."""


class NotFound(PdserveError):
    pass


class FailedPrecondition(PdserveError):
    pass


class Unavailable(PdserveError):
    pass


class DeadlineExceeded(PdserveError):
    pass


class Cancelled(PdserveError):
    pass


class PermissionDenied(PdserveError):
    """The caller asked for something this tier never does for anyone (push KV to an address it does not know)."""


class Aborted(PdserveError):
    """Work the service gave up on (a reservation whose lease ran out): sending the request again may succeed."""


class Internal(PdserveError):
    """A fault of the service, not the request; the tier's log has the details."""


class Upstream(PdserveError):
    """Another tier answered a call with an error: its status (a gRPC status name, e.g. "UNAVAILABLE") goes
    back to this tier's caller with the message, so a client sees what the tier behind it said."""

    def __init__(self, status: str, message: str) -> None:
        super().__init__(message)
        self.status = status
