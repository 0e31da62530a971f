"""Typed errors of the service. common/edge/errors.py maps each to one gRPC status code, in one place."""


class PdserveError(Exception):
    """Base class; the message is what the caller sees, so it says what to change."""


class InvalidArgument(PdserveError):
    pass


class ResourceExhausted(PdserveError):
    pass


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


class Internal(PdserveError):
    """A fault of the service, not the request; the tier's log has the details."""


class Upstream(PdserveError):
    """Another tier answered a call with an error: its status (a gRPC status name, e.g. "UNAVAILABLE") goes
    back to this tier's caller with the message, so a client sees what the tier behind it said."""

    def __init__(self, status: str, message: str) -> None:
        super().__init__(message)
        self.status = status
