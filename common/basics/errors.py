"""Typed errors of the service. common/edge/server.py maps each to one gRPC status code, in one place."""


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
