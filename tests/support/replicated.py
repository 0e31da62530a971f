"""A stack of several replicas per tier under `pdserve up`, and what fault tests ask of it: each instance's
process, health, stats and KV blocks."""

import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2
from stack import launch_stack, stop_stack, tier_identity
from stack_probes import instance_pids

from common.edge.server import health_status, is_serving, make_channel
from gateway.server import instance_service
from pdserve.v1 import (
    decode_pb2,
    decode_pb2_grpc,
    gateway_pb2_grpc,
    prefill_pb2,
    prefill_pb2_grpc,
)

RESTART_TIMEOUT_S = 180
SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING


class Replicated:
    def __init__(self, process, addresses: dict[str, str]) -> None:
        self.process, self.addresses = process, addresses
        self.gateway_channel = grpc.insecure_channel(addresses["gateway"])
        self.gateway = gateway_pb2_grpc.GatewayStub(self.gateway_channel)
        self.decodes = sorted(a for name, a in addresses.items() if name.startswith("decode-"))
        self.prefills = sorted(a for name, a in addresses.items() if name.startswith("prefill-"))
        self._channels = {a: make_channel(a, tier_identity()) for a in (*self.decodes, *self.prefills)}

    def decode_stats(self, address: str) -> decode_pb2.DecodeStats:
        return decode_pb2_grpc.DecodeStub(self._channels[address]).Stats(decode_pb2.StatsRequest(), timeout=10)

    def prefill_stats(self, address: str) -> prefill_pb2.PrefillStats:
        return prefill_pb2_grpc.PrefillStub(self._channels[address]).Stats(prefill_pb2.PrefillStatsRequest(),
                                                                            timeout=10)

    def pid(self, address: str) -> int:
        return instance_pids(self.process.pid)[address]

    def serving(self, address: str) -> bool:
        return is_serving(address, tls=tier_identity())

    def wait_until(self, condition, timeout_s: float, what: str) -> float:
        started = time.monotonic()
        while not condition():
            assert time.monotonic() - started < timeout_s, f"{what} within {timeout_s} s; the stack said:\n{self.log_tail()}"
            time.sleep(0.1)
        return time.monotonic() - started

    def in_rotation(self, address: str) -> bool:
        """Whether the gateway has the instance in its rotation (its per-instance health entry)."""
        return health_status(self.addresses["gateway"], service=instance_service(address)) == SERVING

    def wait_all_serving(self) -> float:
        """Until every instance serves and the gateway has each in rotation; returns the seconds waited."""
        return self.wait_until(lambda: all(self.serving(a) and self.in_rotation(a)
                                           for a in (*self.decodes, *self.prefills))
                               and health_status(self.addresses["gateway"]) == SERVING, RESTART_TIMEOUT_S,
                               "every instance serving again, in the gateway's rotation")

    def holder(self) -> str:
        """The decode instance with a sequence running (one request in flight)."""
        running = [a for a in self.decodes if self.decode_stats(a).num_running]
        assert len(running) == 1, running
        return running[0]

    def assert_no_blocks_held(self) -> None:
        """Quiescent: every decode and prefill instance has all its KV blocks free."""
        def free() -> bool:
            return (all(s.num_blocks_free == s.num_blocks_total for s in map(self.decode_stats, self.decodes))
                    and all(s.num_blocks_free == s.num_blocks_total for s in map(self.prefill_stats, self.prefills)))
        self.wait_until(free, 10, "every KV block free on every instance")

    def log_tail(self, lines: int = 40) -> str:
        """The last lines the launcher and its tiers printed (stdout and stderr)."""
        return "".join(self.process.output[-lines:])

    def close(self) -> None:
        for channel in (*self._channels.values(), self.gateway_channel):
            channel.close()


@contextmanager
def replicated_stack(model_dir: Path, *extra: str, prefill_replicas: int = 2,
                     decode_replicas: int = 2) -> Iterator[Replicated]:
    process, addresses = launch_stack(model_dir, *extra, prefill_replicas=prefill_replicas,
                                      decode_replicas=decode_replicas)
    stack = Replicated(process, addresses)
    try:
        yield stack
    finally:
        stack.close()
        stop_stack(process)
