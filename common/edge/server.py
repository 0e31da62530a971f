"""The service edge shared by every tier: servers with a bounded message size, channels and listening ports with
mutual TLS (or plaintext where no identity is configured), health, request metadata and deadlines, running until
a signal."""

import signal
import threading
import time
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

REQUEST_ID_KEY = "x-request-id"
_NO_DEADLINE_S = 10**7
# Room for a message's own fields beside its payload (protobuf framing, metadata-sized strings).
MESSAGE_MARGIN_BYTES = 64 * 1024


@dataclass(frozen=True)
class Tls:
    """A tier's identity for mutual TLS: its certificate and key, and the CA that signs every tier's (PEM bytes).
    Internal servers require a client certificate from that CA; clients verify the server's against it."""

    cert: bytes
    key: bytes
    ca: bytes

    @classmethod
    def from_files(cls, cert: Path | None, key: Path | None, ca: Path | None) -> "Tls | None":
        """None when no file is given (plaintext); all three or none."""
        given = [path for path in (cert, key, ca) if path is not None]
        if not given:
            return None
        if len(given) != 3:
            raise ValueError("--tls-cert, --tls-key and --tls-ca go together (mutual TLS needs all three)")
        return cls(cert.read_bytes(), key.read_bytes(), ca.read_bytes())

    def server_credentials(self, require_client_auth: bool = True) -> grpc.ServerCredentials:
        return grpc.ssl_server_credentials([(self.key, self.cert)], root_certificates=self.ca,
                                           require_client_auth=require_client_auth)

    def channel_credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(root_certificates=self.ca, private_key=self.key,
                                            certificate_chain=self.cert)


def make_server(max_receive_bytes: int, max_workers: int = 256) -> grpc.Server:
    """A server that refuses any message larger than max_receive_bytes (the largest valid one, with margin)."""
    return grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers),
                       options=[("grpc.max_receive_message_length", max_receive_bytes)])


# A channel to an instance that died retries its connection with a back-off that gRPC lets grow to 120 s: a
# restarted instance would stay unreachable long after it serves again. Capped at a second, as the health checks.
_RECONNECT_OPTIONS = [("grpc.initial_reconnect_backoff_ms", 250), ("grpc.min_reconnect_backoff_ms", 250),
                      ("grpc.max_reconnect_backoff_ms", 1000)]


def make_channel(address: str, tls: Tls | None = None, tls_name: str | None = None) -> grpc.Channel:
    """A channel to another tier: mutual TLS when this tier has an identity, plaintext otherwise; reconnecting
    within a second once the other side is back. tls_name: the name the peer's certificate must carry when it
    is not the address's host (an instance found by a DNS name: common/edge/discovery.py)."""
    if tls is None:
        return grpc.insecure_channel(address, options=_RECONNECT_OPTIONS)
    options = [*_RECONNECT_OPTIONS, *([("grpc.ssl_target_name_override", tls_name)] if tls_name else [])]
    return grpc.secure_channel(address, tls.channel_credentials(), options=options)


def add_health(server: grpc.Server) -> health.HealthServicer:
    """Serves grpc.health.v1.Health; the overall status starts NOT_SERVING until set_serving."""
    servicer = health.HealthServicer()
    servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    return servicer


def set_serving(servicer: health.HealthServicer, service_names: list[str]) -> None:
    for name in ["", *service_names]:
        servicer.set(name, health_pb2.HealthCheckResponse.SERVING)


def set_not_serving(servicer: health.HealthServicer, service_names: list[str]) -> None:
    """What a draining tier reports at once, so callers and balancers send new work elsewhere."""
    for name in ["", *service_names]:
        servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)


def drain(health_servicer: health.HealthServicer, service_names: list[str], busy: Callable[[], bool],
          timeout_s: float, poll_s: float = 0.1) -> bool:
    """Reports NOT_SERVING, then waits until busy() is false or timeout_s passes; returns whether it emptied.
    The caller has already stopped admitting new work."""
    set_not_serving(health_servicer, service_names)
    deadline = time.monotonic() + timeout_s
    while busy():
        if time.monotonic() >= deadline:
            return False
        time.sleep(poll_s)
    return True


def health_status(address: str, timeout_s: float = 1.0, tls: Tls | None = None, service: str = "",
                  tls_name: str | None = None) -> int | None:
    """The server's grpc.health.v1 status (overall, or of `service`), or None when it does not answer."""
    try:
        with make_channel(address, tls, tls_name) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout_s).status
    except grpc.RpcError:
        return None


def is_serving(address: str, timeout_s: float = 1.0, tls: Tls | None = None, tls_name: str | None = None) -> bool:
    return health_status(address, timeout_s, tls, tls_name=tls_name) == health_pb2.HealthCheckResponse.SERVING


def time_remaining_s(context: grpc.ServicerContext) -> float | None:
    """Seconds until the caller's deadline, or None when it set none (grpc reports a far future then)."""
    remaining = context.time_remaining()
    return remaining if remaining is not None and remaining < _NO_DEADLINE_S else None


def metadata_value(context: grpc.ServicerContext, key: str) -> str | None:
    for item in context.invocation_metadata() or ():
        if item.key == key:
            return item.value
    return None


def bind(server: grpc.Server, host: str, port: int, credentials: grpc.ServerCredentials | None = None) -> int:
    """Listens on host:port (TLS with credentials, plaintext without); returns the bound port."""
    address = f"{host}:{port}"
    bound = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
    if bound == 0:
        raise OSError(f"cannot listen on {host}:{port} (in use?)")
    return bound


def wait_for_signal() -> None:
    """Blocks until SIGINT or SIGTERM."""
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
