"""The service edge shared by every tier: server and channel construction, health, and the one place
where typed errors become gRPC status codes."""

import functools
import inspect
import signal
import threading
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from common.basics import errors

MAX_MESSAGE_BYTES = 256 * 1024 * 1024
_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
]
REQUEST_ID_KEY = "x-request-id"
_NO_DEADLINE_S = 10**7

_STATUS_OF = {
    errors.InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    errors.ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.NotFound: grpc.StatusCode.NOT_FOUND,
    errors.FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    errors.Unavailable: grpc.StatusCode.UNAVAILABLE,
    errors.DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
    errors.Cancelled: grpc.StatusCode.CANCELLED,
    errors.Internal: grpc.StatusCode.INTERNAL,
}


def status_of(error: errors.PdserveError) -> grpc.StatusCode:
    for kind in type(error).__mro__:
        if kind in _STATUS_OF:
            return _STATUS_OF[kind]
    return grpc.StatusCode.INTERNAL


def maps_errors(method):
    """Servicer method decorator: a PdserveError aborts the RPC with its status and message."""
    if inspect.isgeneratorfunction(method):
        @functools.wraps(method)
        def stream(self, request, context):
            try:
                yield from method(self, request, context)
            except errors.PdserveError as error:
                context.abort(status_of(error), str(error))
        return stream

    @functools.wraps(method)
    def unary(self, request, context):
        try:
            return method(self, request, context)
        except errors.PdserveError as error:
            context.abort(status_of(error), str(error))
    return unary


def make_server(max_workers: int = 256) -> grpc.Server:
    return grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers), options=_OPTIONS)


def make_channel(address: str) -> grpc.Channel:
    return grpc.insecure_channel(address, options=_OPTIONS)


def add_health(server: grpc.Server) -> health.HealthServicer:
    """Serves grpc.health.v1.Health; the overall status starts NOT_SERVING until set_serving."""
    servicer = health.HealthServicer()
    servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    return servicer


def set_serving(servicer: health.HealthServicer, service_names: list[str]) -> None:
    for name in ["", *service_names]:
        servicer.set(name, health_pb2.HealthCheckResponse.SERVING)


def is_serving(address: str, timeout_s: float = 1.0) -> bool:
    try:
        with make_channel(address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=timeout_s)
            return reply.status == health_pb2.HealthCheckResponse.SERVING
    except grpc.RpcError:
        return False


def time_remaining_s(context: grpc.ServicerContext) -> float | None:
    """Seconds until the caller's deadline, or None when it set none (grpc reports a far future then)."""
    remaining = context.time_remaining()
    return remaining if remaining is not None and remaining < _NO_DEADLINE_S else None


def metadata_value(context: grpc.ServicerContext, key: str) -> str | None:
    for item in context.invocation_metadata() or ():
        if item.key == key:
            return item.value
    return None


def bind(server: grpc.Server, host: str, port: int) -> int:
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"cannot listen on {host}:{port} (in use?)")
    return bound


def wait_for_signal() -> None:
    """Blocks until SIGINT or SIGTERM."""
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
