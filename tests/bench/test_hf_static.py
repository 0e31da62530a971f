"""The hf-static peer: requests that arrive while a batch runs are grouped into the next one, padded, and
each still gets exactly what Hugging Face generate gives it alone."""

import threading

import grpc
import pytest

from common.bench.hf_static import serve
from helpers import collect, hf_greedy, request
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


def test_requests_arriving_together_share_a_padded_batch_and_match_solo_generate(hf_static, hf_model):
    gateway, stats = hf_static
    results: dict[int, list[int]] = {}
    # a first request occupies the batcher, so the three that follow wait and form one batch
    blocker = threading.Thread(target=collect, args=(gateway, request(token_ids=[2_000, 2_001], max_new_tokens=12)))
    blocker.start()
    threads = [threading.Thread(target=lambda i=i: results.__setitem__(
        i, collect(gateway, request(token_ids=PROMPTS[i], max_new_tokens=MAX_NEW[i]))[0])) for i in range(3)]
    for thread in threads:
        thread.start()
    for thread in [blocker, *threads]:
        thread.join(timeout=120)
    for i, prompt in enumerate(PROMPTS):
        assert results[i] == hf_greedy(hf_model, prompt, MAX_NEW[i])
    assert stats.Stats(decode_pb2.StatsRequest(), timeout=10).max_batch_size >= 2


def test_text_prompts_are_refused_with_a_clear_error(hf_static):
    gateway, _ = hf_static
    with pytest.raises(grpc.RpcError) as raised:
        collect(gateway, request("Hello", max_new_tokens=2), timeout=30)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_a_cancelled_request_gets_no_tokens_and_does_not_hold_up_the_next(hf_model):
    from common.bench.hf_static import StaticBatcher

    model, tokenizer = hf_model
    batcher = StaticBatcher(model, tokenizer.eos_token_id, frozenset([tokenizer.eos_token_id]), max_batch_size=8)
    running = batcher.submit([2_100, 2_101, 2_102], 8)
    gone = batcher.submit([2_200, 2_201], 8)
    gone.cancelled = True  # as the client's cancel callback does
    after = batcher.submit([2_300, 2_301], 2)
    for slot in (running, after):
        while slot.tokens.get(timeout=60) is not None:
            pass
    assert gone.num_generated == 0 and gone.tokens.empty()
    assert after.num_generated == 2
