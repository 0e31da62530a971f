"""The tiers as separately configured processes: health, reflection, the KV-layout handshake, and the
launcher's clean shutdown."""

import os

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from helpers import collect, request
from stack import internal_channel, launch_stack, stop_stack

from common.basics.config import DecodeConfig, GatewayConfig, PrefillConfig
from decode_svc.server import start_decode
from gateway.server import start_gateway
from pdserve.v1 import gateway_pb2_grpc
from prefill_svc.server import start_prefill


def test_every_tier_reports_serving(stack):
    for address in (stack.gateway_address, stack.prefill_address, stack.decode_address):
        with grpc.insecure_channel(address) if address == stack.gateway_address else internal_channel(address) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_gateway_serves_reflection(stack):
    with grpc.insecure_channel(stack.gateway_address) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        replies = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                            timeout=10)
        services = {s.name for r in replies for s in r.list_services_response.service}
    assert "pdserve.v1.Gateway" in services


@pytest.fixture(scope="module")
def mismatched_tiers(model_dir):
    """A float16-KV decode instance behind a float32-KV prefill instance."""
    decode = start_decode(DecodeConfig(model_dir=model_dir, kv_dtype="float16", kv_memory_mb=64))
    prefill = start_prefill(PrefillConfig(model_dir=model_dir, kv_memory_mb=64,
                                          decode_addresses=(f"127.0.0.1:{decode.port}",)))
    # every prompt through the prefill tier: a short one would otherwise be prefilled on decode, never meeting it
    gateway = start_gateway(GatewayConfig(model_dir=model_dir, port=0, prefill_addresses=(f"127.0.0.1:{prefill.port}",),
                                          decode_addresses=(f"127.0.0.1:{decode.port}",), local_prefill_tokens=0))
    yield gateway, decode
    for server in (gateway, prefill, decode):
        server.stop()


def test_mismatched_kv_layout_is_refused_with_a_clear_error(mismatched_tiers):
    gateway, decode = mismatched_tiers
    with grpc.insecure_channel(f"127.0.0.1:{gateway.port}") as channel:
        with pytest.raises(grpc.RpcError) as raised:
            collect(gateway_pb2_grpc.GatewayStub(channel), request("Hello", max_new_tokens=4), timeout=60)
    assert raised.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "kv_dtype: float32 here, float16 there" in raised.value.details()
    assert decode.engine.stats().num_blocks_free == decode.engine.stats().num_blocks_total


def test_launcher_serves_and_stops_every_tier_on_sigterm(model_dir):
    process, addresses = launch_stack(model_dir)
    children = _child_pids(process.pid)
    try:
        with grpc.insecure_channel(addresses["gateway"]) as channel:
                token_ids, text, _ = collect(gateway_pb2_grpc.GatewayStub(channel), request("Hi there", max_new_tokens=3))
        assert len(token_ids) == 3 and text
    finally:
        code = stop_stack(process)
    assert code == 0
    assert len(children) == 3
    assert not [pid for pid in children if _alive(pid)]


def _child_pids(pid: int) -> list[int]:
    children = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        children.append(int(entry))
            except OSError:
                continue
    return children


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
