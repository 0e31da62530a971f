"""`pdserve up --colocated`: prefill and decode engines in one process over one copy of the weights, with
each process pinned to the cores given (--colocated-cpus, --gateway-cpus)."""

import os
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from helpers import assert_greedy_matches, collect, hf_greedy, request
from stack import internal_channel, launch_stack, stop_stack
from stack_probes import tier_pids

from pdserve.v1 import (
    decode_pb2,
    decode_pb2_grpc,
    gateway_pb2_grpc,
    prefill_pb2,
    prefill_pb2_grpc,
)

ENGINE_CPU = min(os.sched_getaffinity(0))
GATEWAY_CPU = max(os.sched_getaffinity(0))


@pytest.fixture(scope="module")
def colocated(model_dir):
    process, addresses = launch_stack(model_dir, "--colocated", "--colocated-cpus", str(ENGINE_CPU),
                                      "--gateway-cpus", str(GATEWAY_CPU))
    yield process, addresses
    stop_stack(process)


def test_one_engine_process_serves_both_services_pinned(colocated):
    process, addresses = colocated
    children = tier_pids(process.pid)
    assert set(children) == {"colocated", "gateway"}
    assert os.sched_getaffinity(children["colocated"]) == {ENGINE_CPU}
    assert os.sched_getaffinity(children["gateway"]) == {GATEWAY_CPU}
    with internal_channel(addresses["prefill"]) as channel:
        assert prefill_pb2_grpc.PrefillStub(channel).Stats(prefill_pb2.PrefillStatsRequest(), timeout=10).num_blocks_total
    with internal_channel(addresses["decode"]) as channel:
        assert decode_pb2_grpc.DecodeStub(channel).Stats(decode_pb2.StatsRequest(), timeout=10).num_blocks_total


def test_concurrent_long_and_short_prompts_match_transformers(colocated, hf_model):
    """Both engines step at once over the shared weights; every output is still Hugging Face's."""
    _, addresses = colocated
    prompts = [[3_000 + (7 * i) % 500 for i in range(300)], [1_200, 1_201, 1_202], [4_000 + i for i in range(20)]]
    with grpc.insecure_channel(addresses["gateway"]) as channel, ThreadPoolExecutor(len(prompts)) as pool:
        stub = gateway_pb2_grpc.GatewayStub(channel)
        futures = [pool.submit(collect, stub, request(token_ids=p, max_new_tokens=8), 180) for p in prompts]
        outputs = [future.result()[0] for future in futures]
    for prompt, output in zip(prompts, outputs):
        assert_greedy_matches(hf_model, prompt, output, hf_greedy(hf_model, prompt, 8))
