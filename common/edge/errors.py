"""The one place where typed errors (common/basics/errors.py) become gRPC status codes, for every service
edge, and where a tier's gRPC error becomes a typed one again (`upstream`)."""

import functools
import inspect

import grpc

from common.basics import errors

RETRY_PUSHBACK_KEY = "grpc-retry-pushback-ms"

_STATUS_OF = {
    errors.InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    errors.ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.NotFound: grpc.StatusCode.NOT_FOUND,
    errors.FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    errors.Unavailable: grpc.StatusCode.UNAVAILABLE,
    errors.DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
    errors.Cancelled: grpc.StatusCode.CANCELLED,
    errors.Aborted: grpc.StatusCode.ABORTED,
    errors.PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    errors.Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    errors.Internal: grpc.StatusCode.INTERNAL,
}


def status_of(error: errors.PdserveError) -> grpc.StatusCode:
    if isinstance(error, errors.Upstream):
        return grpc.StatusCode[error.status]
    for kind in type(error).__mro__:
        if kind in _STATUS_OF:
            return _STATUS_OF[kind]
    return grpc.StatusCode.INTERNAL


def abort(context: grpc.ServicerContext, error: errors.PdserveError) -> None:
    """Ends the call with the error's status and message; an error that clears with time tells the client when
    to try again (grpc-retry-pushback-ms, which gRPC's own retry policy honours)."""
    retry_after_s = getattr(error, "retry_after_s", None)
    if retry_after_s is not None:
        context.set_trailing_metadata([(RETRY_PUSHBACK_KEY, str(max(1, round(retry_after_s * 1000))))])
    context.abort(status_of(error), str(error))


def maps_errors(method):
    """Servicer method decorator: a PdserveError aborts the RPC with its status and message."""
    if inspect.isgeneratorfunction(method):
        @functools.wraps(method)
        def stream(self, request, context):
            try:
                yield from method(self, request, context)
            except errors.PdserveError as error:
                abort(context, error)
        return stream

    @functools.wraps(method)
    def unary(self, request, context):
        try:
            return method(self, request, context)
        except errors.PdserveError as error:
            abort(context, error)
    return unary


def upstream(error: grpc.RpcError, what: str) -> errors.Upstream:
    """A failed call to another tier as a typed error that keeps its status: `what` says which tier and call."""
    code = error.code() if isinstance(error, grpc.Call) else grpc.StatusCode.UNAVAILABLE
    details = error.details() if isinstance(error, grpc.Call) else str(error)
    return errors.Upstream(code.name, f"{what}: {details}")
