"""Instances found by DNS: a gateway and a prefill tier given `dns://SERVER/decode:PORT` follow the decode
instances that name resolves to, as a Kubernetes headless Service's records follow its ready pods. Decode
instances listen on 127.0.0.2 and 127.0.0.3 (all of 127/8 is loopback), the same port on each, with the
certificate for the name "decode"; a DNS server in this test answers for the name. Under a steady load, an
instance added to the records takes work within a resolution period and a health check, and one taken out of
the records and stopped (SIGTERM: it drains) loses no request."""

import signal
import socket
import subprocess
import sys
import threading
import time

import grpc
import pytest
from dns_server import DnsServer
from helpers import collect, request
from stack import CERTS_DIR, _stop_with_parent, stop_stack, tier_identity

from common.edge.server import is_serving
from pdserve.certs import ensure_certs
from pdserve.launcher import free_port
from pdserve.v1 import decode_pb2, decode_pb2_grpc, gateway_pb2_grpc

RESOLVE_S = 1.0  # the gateway's --resolve-interval-s
HEALTH_S = 1.0  # the gateway's health checks (gateway/membership.py)
HOSTS = ("127.0.0.2", "127.0.0.3")
PROMPTS = [[1000 + 7 * i + j for j in range(24 + i)] for i in range(6)]


def _free_port_on_all(hosts: tuple[str, ...]) -> int:
    for _ in range(50):
        port = free_port(hosts[0])
        try:
            for host in hosts:
                with socket.create_server((host, port)):
                    pass
        except OSError:
            continue
        return port
    raise RuntimeError("no port free on every host")


def _tier(model_dir, tier: str, *args: str) -> subprocess.Popen:
    certs = ensure_certs(CERTS_DIR)
    cert, key = certs.for_tier(tier)
    return subprocess.Popen([sys.executable, "-m", "pdserve.cli", tier, "--model", str(model_dir),
                             "--tls-cert", str(cert), "--tls-key", str(key), "--tls-ca", str(certs.ca),
                             "--metrics-port", "0", "--drain-timeout-s", "10", *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=_stop_with_parent)


def _wait_serving(address: str, tls, timeout_s: float = 180, tls_name: str | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while not is_serving(address, tls=tls, tls_name=tls_name):
        assert time.monotonic() < deadline, f"{address} did not serve in time"
        time.sleep(0.5)


class Load:
    """Two clients sending the prompts in turn until stopped; every reply and every failure is kept."""

    def __init__(self, stub) -> None:
        self.stub, self.replies, self.failures = stub, [], []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(2)]

    def _run(self, offset: int) -> None:
        i = offset
        while not self._stop.is_set():
            prompt = PROMPTS[i % len(PROMPTS)]
            try:
                tokens, _, last = collect(self.stub, request(token_ids=prompt, max_new_tokens=8, speculative=False),
                                          timeout=120)
                self.replies.append((tuple(prompt), tuple(tokens), last.finish_reason))
            except grpc.RpcError as error:
                self.failures.append(f"{error.code().name}: {error.details()}")
            i += 2

    def __enter__(self) -> "Load":
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(180)


@pytest.fixture(scope="module")
def fleet(model_dir):
    dns = DnsServer().start()
    port = _free_port_on_all(HOSTS)
    name = f"dns://{dns.authority()}/decode:{port}"
    dns.set("decode", [HOSTS[0]])
    decodes = {host: _tier(model_dir, "decode", "--host", host, "--port", str(port), "--kv-memory-mb", "256")
               for host in HOSTS}
    prefill_port, gateway_port = free_port("127.0.0.1"), free_port("127.0.0.1")
    prefill = _tier(model_dir, "prefill", "--port", str(prefill_port), "--decode", name, "--kv-memory-mb", "128")
    identity = tier_identity()
    for host in HOSTS:
        _wait_serving(f"{host}:{port}", identity, tls_name="decode")  # its certificate names "decode", not the IP
    _wait_serving(f"127.0.0.1:{prefill_port}", identity)
    gateway = _tier(model_dir, "gateway", "--port", str(gateway_port), "--prefill", f"127.0.0.1:{prefill_port}",
                    "--decode", name, "--resolve-interval-s", str(RESOLVE_S), "--local-prefill-tokens", "0")
    _wait_serving(f"127.0.0.1:{gateway_port}", None)
    channel = grpc.insecure_channel(f"127.0.0.1:{gateway_port}")
    try:
        yield dns, port, decodes, gateway_pb2_grpc.GatewayStub(channel)
    finally:
        channel.close()
        for process in (gateway, prefill, *decodes.values()):
            stop_stack(process)
        dns.stop()


def _requests_served(host: str, port: int) -> int:
    """Prompt tokens the decode instance at host looked up in its prefix cache: one lookup per reservation."""
    channel = grpc.secure_channel(f"{host}:{port}", tier_identity().channel_credentials(),
                                  options=[("grpc.ssl_target_name_override", "decode")])
    with channel:
        return decode_pb2_grpc.DecodeStub(channel).Stats(decode_pb2.StatsRequest(), timeout=10).num_prefix_query_tokens


@pytest.mark.slow  # four processes of its own: `make slow`
def test_decode_instances_that_come_and_go_by_dns_take_work_and_lose_no_request(fleet):
    dns, port, decodes, gateway = fleet
    first, second = HOSTS
    with Load(gateway) as load:
        while len(load.replies) < 4 and not load.failures:
            time.sleep(0.1)
        assert _requests_served(second, port) == 0  # not in the records: never sent work
        dns.set("decode", [first, second])
        added = time.monotonic()
        while _requests_served(second, port) == 0:
            assert time.monotonic() - added < RESOLVE_S + HEALTH_S + 10, "the added instance took no work"
            time.sleep(0.1)
        took_work_s = time.monotonic() - added
        dns.set("decode", [second])
        time.sleep(RESOLVE_S + 0.5)  # the gateway has left it out: what it holds drains
        decodes[first].send_signal(signal.SIGTERM)
        assert decodes[first].wait(60) == 0
        served_before = len(load.replies)
        while len(load.replies) < served_before + 6 and not load.failures:
            time.sleep(0.1)
    assert load.failures == []
    outputs: dict[tuple, set] = {}
    for prompt, tokens, reason in load.replies:
        outputs.setdefault(prompt, set()).add(tokens)
    assert all(len(seen) == 1 for seen in outputs.values()), "a prompt got two different greedy outputs"
    print(f"\nthe added decode instance took its first request {took_work_s:.1f} s after the records changed")
