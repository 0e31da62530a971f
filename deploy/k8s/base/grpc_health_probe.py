"""The exec probe of a pdserve tier in Kubernetes: asks its grpc.health.v1 service, as compose's healthcheck does.

Kubernetes' own `grpc:` probe cannot present a client certificate, and prefill and decode let in only callers
with a certificate from the deployment's CA, so their probes run this with the tier's own certificate (it is a
client certificate too). Exits 0 when the tier answers SERVING; with --alive, when it answers at all: a tier
that loads its model or drains answers NOT_SERVING, out of rotation but not to be restarted. Needs only grpcio
and grpcio-health-checking, both in the image.

    python /probe/grpc_health_probe.py localhost:50052 --tls /secrets/prefill.pem /secrets/prefill-key.pem \
        /secrets/ca.pem [--alive]
"""

import argparse
import sys
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="grpc.health.v1 probe of a pdserve tier")
    parser.add_argument("address", help="host:port of the tier's gRPC port")
    parser.add_argument("--tls", nargs=3, type=Path, metavar=("CERT", "KEY", "CA"),
                        help="mutual TLS with this certificate and key, trusting this CA (the tier's own files)")
    parser.add_argument("--alive", action="store_true", help="any answer passes (liveness), not only SERVING")
    parser.add_argument("--timeout-s", type=float, default=3.0)
    return parser


def health_status(address: str, tls: list[Path] | None, timeout_s: float) -> int | None:
    """The server's overall health status, or None when it does not answer."""
    if tls:
        cert, key, ca = (path.read_bytes() for path in tls)
        channel = grpc.secure_channel(address, grpc.ssl_channel_credentials(ca, key, cert))
    else:
        channel = grpc.insecure_channel(address)
    with channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=timeout_s)
        except grpc.RpcError:
            return None
    return reply.status


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    status = health_status(args.address, args.tls, args.timeout_s)
    passed = status is not None if args.alive else status == health_pb2.HealthCheckResponse.SERVING
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
