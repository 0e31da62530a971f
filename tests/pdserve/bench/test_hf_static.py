"""The hf-static peer: requests that arrive while a batch runs are grouped into the next one, padded, and
each still gets exactly what Hugging Face generate gives it alone."""

import grpc
import pytest
from helpers import collect, hf_greedy, request

from pdserve.bench.hf_static import serve
from pdserve.v1 import decode_pb2, decode_pb2_grpc, gateway_pb2_grpc

PROMPTS = [[1_500 + i for i in range(n)] for n in (5, 17, 9)]  # different lengths: left padding matters
MAX_NEW = [6, 3, 5]


@pytest.fixture(scope="module")
def hf_static(hf_model):
    model, tokenizer = hf_model
    server, port = serve(model, frozenset([tokenizer.eos_token_id]), tokenizer.eos_token_id, "127.0.0.1", 0,
                         max_batch_size=8)
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    yield gateway_pb2_grpc.GatewayStub(channel), decode_pb2_grpc.DecodeStub(channel)
    channel.close()
    server.stop(0)


def _drain(slot) -> list[int]:
    tokens = []
    while (token := slot.tokens.get(timeout=120)) is not None:
        tokens.append(token)
    return tokens


def test_requests_arriving_together_share_a_padded_batch_and_match_solo_generate(hf_model):
    """Requests that arrive while a batch runs wait and form the next batch together: a first request holds
    the batcher until the three others are queued, then its client goes away (its row stops at the next
    step), so the three run as one padded batch whatever the threads' timing."""
    from pdserve.bench.hf_static import StaticBatcher

    model, tokenizer = hf_model
    batcher = StaticBatcher(model, tokenizer.eos_token_id, frozenset([tokenizer.eos_token_id]), max_batch_size=8)
    blocker = batcher.submit([2_000, 2_001], 200)
    blocker.tokens.get(timeout=120)  # its batch is running
    slots = [batcher.submit(prompt, max_new) for prompt, max_new in zip(PROMPTS, MAX_NEW)]
    assert not blocker.finish_reason  # still running when the three were queued
    blocker.cancelled = True
    for slot, prompt, max_new in zip(slots, PROMPTS, MAX_NEW):
        assert _drain(slot) == hf_greedy(hf_model, prompt, max_new)
    assert batcher.counters["batch_max"] == 3


def test_the_gateway_streams_what_generate_gives(hf_static, hf_model):
    gateway, stats = hf_static
    assert collect(gateway, request(token_ids=PROMPTS[1], max_new_tokens=MAX_NEW[1]))[0] == \
        hf_greedy(hf_model, PROMPTS[1], MAX_NEW[1])
    assert stats.Stats(decode_pb2.StatsRequest(), timeout=10).max_batch_size == 1


def test_text_prompts_are_refused_with_a_clear_error(hf_static):
    gateway, _ = hf_static
    with pytest.raises(grpc.RpcError) as raised:
        collect(gateway, request("Hello", max_new_tokens=2), timeout=30)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_a_cancelled_request_gets_no_tokens_and_does_not_hold_up_the_next(hf_model):
    from pdserve.bench.hf_static import StaticBatcher

    model, tokenizer = hf_model
    batcher = StaticBatcher(model, tokenizer.eos_token_id, frozenset([tokenizer.eos_token_id]), max_batch_size=8)
    running = batcher.submit([2_100, 2_101, 2_102], 8)
    running.tokens.get(timeout=120)  # its batch is running: the next two wait
    gone = batcher.submit([2_200, 2_201], 8)
    gone.cancelled = True  # as the client's cancel callback does, while it waits
    after = batcher.submit([2_300, 2_301], 2)
    for slot in (running, after):
        _drain(slot)
    assert gone.num_generated == 0 and gone.tokens.empty()
    assert after.num_generated == 2
