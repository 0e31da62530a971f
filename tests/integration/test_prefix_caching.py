"""Prefix caching, KV-aware routing, conditional disaggregation and lazy KV growth through the real stack
(`pdserve up`, mutual TLS between the tiers): two prefill and two decode replicas, where a repeated prefix goes
back to the instances that hold it, its KV is neither recomputed nor pushed again, a short uncached part is
prefilled by the decode instance itself, and the output is transformers' greedy output; and one decode instance
with a pool too small for its requests' final lengths, where every request completes by preemption."""

import random
import threading
import time

import pytest
from helpers import assert_greedy_matches, collect, hf_greedy, request
from replicated import replicated_stack

from pdserve.v1 import common_pb2, decode_pb2_grpc, prefill_pb2_grpc

POLL_MS = 100
LOCAL_TOKENS = 24  # the stack's --local-prefill-tokens
BLOCK = 16  # tests/support/stack.py's --block-size


def _ids(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(1000, 40000) for _ in range(n)]


def _summary(stack, address: str) -> common_pb2.CacheSummary:
    channel = stack._channels[address]
    stub = (prefill_pb2_grpc.PrefillStub if address in stack.prefills else decode_pb2_grpc.DecodeStub)(channel)
    return stub.GetCacheSummary(common_pb2.CacheSummaryRequest(), timeout=10)


def _holders(stack, addresses: list[str]) -> list[str]:
    return [a for a in addresses if _summary(stack, a).block_hashes]


@pytest.fixture(scope="module")
def replicas(model_dir):
    with replicated_stack(model_dir, "--cache-poll-ms", str(POLL_MS), "--local-prefill-tokens",
                          str(LOCAL_TOKENS)) as stack:
        stack.wait_all_serving()
        yield stack


def test_a_repeated_prefix_goes_to_the_instances_that_hold_it_and_is_not_recomputed(replicas, hf_model):
    stack, rng = replicas, random.Random(160)
    document = _ids(rng, 200)  # 12 full blocks and 8 tokens
    first = document + _ids(rng, 6)
    _, _, last = collect(stack.gateway, request(token_ids=first, max_new_tokens=8, speculative=False))
    assert last.timings.prefill_path == "prefill-tier" and last.usage.cached_tokens == 0
    full_bytes = last.timings.kv_bytes
    prefill_holder, decode_holder = _holders(stack, stack.prefills), _holders(stack, stack.decodes)
    assert len(prefill_holder) == 1 and len(decode_holder) == 1
    # The one timing condition here: the gateway's index polls every 100 ms (a reply takes about a millisecond);
    # 2 s is 20 polls. No outside view of the index exists to wait on instead.
    time.sleep(20 * POLL_MS / 1000)
    before = {a: stack.decode_stats(a).num_prefix_query_tokens for a in stack.decodes}

    # A longer uncached part: the prefill tier computes only it and pushes only what decode lacks.
    longer = document + _ids(rng, 40)
    got, _, last = collect(stack.gateway, request(token_ids=longer, max_new_tokens=8, speculative=False))
    assert last.timings.prefill_path == "prefill-tier" and last.usage.cached_tokens == 192
    assert last.timings.kv_bytes == full_bytes * (len(longer) - 192) // len(first)
    assert_greedy_matches(hf_model, longer, got, hf_greedy(hf_model, longer, 8))

    # A short uncached part: the decode instance that holds the prefix prefills it itself.
    for _ in range(3):
        turn = document + _ids(rng, 10)
        got, _, last = collect(stack.gateway, request(token_ids=turn, max_new_tokens=8, speculative=False))
        assert last.timings.prefill_path == "decode-local" and last.timings.kv_bytes == 0
        assert last.usage.cached_tokens == 192
        assert_greedy_matches(hf_model, turn, got, hf_greedy(hf_model, turn, 8))
    after = {a: stack.decode_stats(a).num_prefix_query_tokens for a in stack.decodes}
    assert [a for a in stack.decodes if after[a] != before[a]] == decode_holder
    assert stack.decode_stats(decode_holder[0]).num_local_prefills == 3
    prefill = stack.prefill_stats(prefill_holder[0])
    assert prefill.num_prompts == 2 and prefill.num_prefix_hit_tokens == 192
    stack.assert_no_blocks_held()


def test_a_short_fresh_prompt_is_prefilled_on_decode_and_a_long_one_on_the_prefill_tier(replicas, hf_model):
    stack, rng = replicas, random.Random(161)
    short, long = _ids(rng, 12), _ids(rng, 90)
    got, _, last = collect(stack.gateway, request(token_ids=short, max_new_tokens=8, speculative=False))
    assert last.timings.prefill_path == "decode-local" and last.timings.prefill_ms > 0
    assert_greedy_matches(hf_model, short, got, hf_greedy(hf_model, short, 8))
    got, _, last = collect(stack.gateway, request(token_ids=long, max_new_tokens=8, speculative=False))
    assert last.timings.prefill_path == "prefill-tier" and last.timings.kv_bytes > 0
    assert_greedy_matches(hf_model, long, got, hf_greedy(hf_model, long, 8))
    stack.assert_no_blocks_held()


@pytest.mark.slow  # its own stack; tests/gateway/test_prefix_reuse.py preempts over the same engines in make test
def test_a_decode_pool_too_small_for_the_final_lengths_serves_every_request_by_preemption(model_dir, hf_model):
    """--kv-blocks 12: four requests of 20 + 40 tokens need 16 blocks at their end; all are accepted, the most
    recently admitted is preempted when the pool runs out, and each output is transformers' (its solo run)."""
    rng = random.Random(162)
    prompts = [_ids(rng, 20) for _ in range(4)]
    with replicated_stack(model_dir, "--kv-blocks", "12", prefill_replicas=1, decode_replicas=1) as stack:
        stack.wait_all_serving()
        outputs: dict[int, list[int]] = {}

        def run(index: int) -> None:
            outputs[index] = collect(stack.gateway, request(token_ids=prompts[index], max_new_tokens=40,
                                                            speculative=False))[0]

        threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(300)
        stats = stack.decode_stats(stack.decodes[0])
        assert stats.num_preemptions >= 1 and stats.num_blocks_total == 12
        for index, prompt in enumerate(prompts):
            assert_greedy_matches(hf_model, prompt, outputs[index], hf_greedy(hf_model, prompt, 40))
        stack.assert_no_blocks_held()
