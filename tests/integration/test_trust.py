"""Trust at the edges: the internal tiers let in only holders of a certificate from the stack's CA; the public
gateway checks API keys (hashed at rest, never logged) and each key's limits, and serves TLS when given a
certificate."""

import logging
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from helpers import collect, request
from stack import CERTS_DIR, tier_identity

from common.basics.config import GatewayConfig
from common.edge.auth import KeyLimits
from common.edge.server import Tls, make_channel
from gateway.server import start_gateway
from pdserve.certs import ensure_certs, make_certs
from pdserve.keys import add_key
from pdserve.v1 import decode_pb2, decode_pb2_grpc, gateway_pb2, gateway_pb2_grpc


def _stats(channel: grpc.Channel):
    return decode_pb2_grpc.DecodeStub(channel).Stats(decode_pb2.StatsRequest(), timeout=5)


def test_internal_tiers_let_in_only_the_stacks_own_peers(stack, tmp_path):
    assert _stats(make_channel(stack.decode_address, tier_identity())).num_blocks_total  # the gateway's identity
    foreign = make_certs(tmp_path / "other-ca")
    intruders = {"plaintext": grpc.insecure_channel(stack.decode_address),
                 "another CA's certificate": make_channel(stack.decode_address, Tls.from_files(
                     *foreign.for_tier("gateway"), ensure_certs(CERTS_DIR).ca))}
    for who, channel in intruders.items():
        with pytest.raises(grpc.RpcError) as raised:
            _stats(channel)
        assert raised.value.code() == grpc.StatusCode.UNAVAILABLE, who  # refused at the handshake
        with pytest.raises(grpc.RpcError):
            health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)


@pytest.fixture
def keyed_gateway(stack, model_dir, tmp_path):
    """A second gateway in front of the stack's tiers (mutual TLS with the gateway's identity), with API keys:
    "open" (no limits), "one-at-a-time" (1 concurrent request), "thrifty" (40 tokens a minute)."""
    keys_file = tmp_path / "keys"
    secrets = {name: add_key(keys_file, name, limits) for name, limits in (
        ("open", KeyLimits()), ("one-at-a-time", KeyLimits(max_concurrent=1)),
        ("thrifty", KeyLimits(tokens_per_minute=40)))}
    certs = ensure_certs(CERTS_DIR)
    cert, key = certs.for_tier("gateway")
    gateway = start_gateway(GatewayConfig(model_dir=model_dir, port=0, prefill_addresses=(stack.prefill_address,),
                                          decode_addresses=(stack.decode_address,), tls_cert=cert, tls_key=key,
                                          tls_ca=certs.ca, api_keys_file=keys_file))
    with grpc.insecure_channel(f"127.0.0.1:{gateway.port}") as channel:
        yield gateway_pb2_grpc.GatewayStub(channel), secrets, keys_file
    gateway.stop()


def _as(secret: str) -> tuple:
    return (("authorization", f"Bearer {secret}"),)


def test_api_keys_let_in_only_known_keys_and_never_show_them(keyed_gateway, caplog):
    stub, secrets, keys_file = keyed_gateway
    caplog.set_level(logging.DEBUG)
    assert secrets["open"] not in keys_file.read_text()  # hashed at rest
    for metadata, message in (((), "authorization: Bearer"), (_as("pdk_not-a-key-of-ours"), "not known")):
        with pytest.raises(grpc.RpcError) as raised:
            list(stub.Generate(request("Hi", max_new_tokens=2), timeout=30, metadata=metadata))
        assert raised.value.code() == grpc.StatusCode.UNAUTHENTICATED and message in raised.value.details()
        assert "pdk_not-a-key-of-ours" not in raised.value.details()
    replies = list(stub.Generate(request("Hi", max_new_tokens=2), timeout=60, metadata=_as(secrets["open"])))
    assert replies[-1].usage.completion_tokens == 2
    assert all(secret not in caplog.text for secret in secrets.values())


def test_every_gateway_call_asks_for_a_key(keyed_gateway):
    stub, secrets, _ = keyed_gateway
    calls = {"Complete": request("Hi", max_new_tokens=2), "Tokenize": gateway_pb2.TokenizeRequest(prompt="Hi"),
             "Detokenize": gateway_pb2.DetokenizeRequest(token_ids=[1]), "GetModelInfo": gateway_pb2.ModelInfoRequest()}
    for name, message in calls.items():
        with pytest.raises(grpc.RpcError) as raised:
            getattr(stub, name)(message, timeout=30)
        assert raised.value.code() == grpc.StatusCode.UNAUTHENTICATED, name
        assert getattr(stub, name)(message, timeout=60, metadata=_as(secrets["open"])), name


def test_a_keys_concurrency_limit_refuses_the_second_request(keyed_gateway):
    stub, secrets, _ = keyed_gateway
    first = stub.Generate(request("Count to a hundred:", max_new_tokens=200, speculative=False), timeout=60,
                          metadata=_as(secrets["one-at-a-time"]))
    next(first)  # admitted and running
    with pytest.raises(grpc.RpcError) as raised:
        list(stub.Generate(request("Hi", max_new_tokens=2), timeout=30, metadata=_as(secrets["one-at-a-time"])))
    assert raised.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    first.cancel()


def test_a_keys_token_budget_refuses_with_a_retry_delay(keyed_gateway):
    stub, secrets, _ = keyed_gateway
    ok = list(stub.Generate(request("Count from one to a hundred:", max_new_tokens=20, speculative=False),
                            timeout=60, metadata=_as(secrets["thrifty"])))
    assert ok[-1].usage.completion_tokens == 20  # with its prompt, 27 of its 40 tokens a minute
    call = stub.Generate(request("Hi there", max_new_tokens=30), timeout=30, metadata=_as(secrets["thrifty"]))
    with pytest.raises(grpc.RpcError) as raised:
        list(call)
    assert raised.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    pushback = dict(raised.value.trailing_metadata() or ())["grpc-retry-pushback-ms"]
    assert 0 < int(pushback) <= 60_000  # refilled at 40 tokens a minute, the shortfall takes under a minute


def test_the_public_port_serves_tls_when_given_a_certificate(stack, model_dir):
    certs = ensure_certs(CERTS_DIR)
    cert, key = certs.for_tier("gateway")
    gateway = start_gateway(GatewayConfig(model_dir=model_dir, port=0, prefill_addresses=(stack.prefill_address,),
                                          decode_addresses=(stack.decode_address,), tls_cert=cert, tls_key=key,
                                          tls_ca=certs.ca, public_tls_cert=cert, public_tls_key=key))
    address = f"127.0.0.1:{gateway.port}"
    try:
        with grpc.secure_channel(address, grpc.ssl_channel_credentials(certs.ca.read_bytes())) as channel:
            token_ids, _, _ = collect(gateway_pb2_grpc.GatewayStub(channel), request("Hi", max_new_tokens=2), 60)
        assert len(token_ids) == 2
        with grpc.insecure_channel(address) as channel, pytest.raises(grpc.RpcError):
            collect(gateway_pb2_grpc.GatewayStub(channel), request("Hi", max_new_tokens=2), 10)
    finally:
        gateway.stop()



def test_beyond_the_reported_capacity_the_gateway_refuses_at_once_with_a_retry_delay(stack, model_dir):
    """Admission from the decode instances' reported batch size: with admission_factor 1/64 over one decode
    instance of 64 slots, one request is admitted; a second meanwhile is refused at once, with
    grpc-retry-pushback-ms; once the first ends, the next is admitted."""
    certs = ensure_certs(CERTS_DIR)
    cert, key = certs.for_tier("gateway")
    slots = stack.decode_stats().batch_capacity
    gateway = start_gateway(GatewayConfig(model_dir=model_dir, port=0, prefill_addresses=(stack.prefill_address,),
                                          decode_addresses=(stack.decode_address,), tls_cert=cert, tls_key=key,
                                          tls_ca=certs.ca, admission_factor=1 / slots))
    try:
        with grpc.insecure_channel(f"127.0.0.1:{gateway.port}") as channel:
            stub = gateway_pb2_grpc.GatewayStub(channel)
            first = stub.Generate(request("Count to a hundred:", max_new_tokens=200, speculative=False), timeout=60)
            next(first)  # admitted and running
            sent = time.monotonic()
            with pytest.raises(grpc.RpcError) as raised:
                collect(stub, request("Hi", max_new_tokens=2), 30)
            refused_after_s = time.monotonic() - sent
            assert raised.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "at capacity" in raised.value.details()
            assert int(dict(raised.value.trailing_metadata() or ())["grpc-retry-pushback-ms"]) > 0
            assert refused_after_s < 1.0  # at once: no queue, no call to any tier
            first.cancel()
            deadline = time.monotonic() + 10
            while gateway.servicer.in_flight:
                assert time.monotonic() < deadline
                time.sleep(0.05)
            token_ids, _, _ = collect(stub, request("Hi", max_new_tokens=2), 60)
            assert len(token_ids) == 2
    finally:
        gateway.stop()
