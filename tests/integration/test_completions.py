"""Several completions of one prompt (GenerateRequest.n) through the running stack: completion i equals a single
request with seed + i, the prompt is prefilled once (the later completions find its KV cached), and the stream
interleaves them by index."""

import grpc
import pytest
from helpers import collect, request

from pdserve.v1 import common_pb2

PROMPT = ("The history of computing is a story of abstraction. Early machines were programmed by rewiring panels; "
          "later, stored programs let the same hardware run many tasks. In short,")
N = 4
SEED = 1234


def by_index(replies) -> dict[int, list]:
    found: dict[int, list] = {}
    for reply in replies:
        found.setdefault(reply.index, []).append(reply)
    return found


def test_n_sampled_completions_equal_n_single_requests_with_those_seeds(stack):
    sampling = common_pb2.SamplingParams(temperature=0.9, seed=SEED)
    replies = list(stack.gateway.Generate(request(PROMPT, max_new_tokens=12, sampling=sampling, n=N), timeout=300))
    completions = by_index(replies)
    assert sorted(completions) == list(range(N))
    assert replies[-1].finish_reason and sum(bool(r.finish_reason) for r in replies) == N
    for index, messages in completions.items():
        alone = collect(stack.gateway, request(PROMPT, max_new_tokens=12, sampling=common_pb2.SamplingParams(
            temperature=0.9, seed=SEED + index)))
        assert [t for m in messages for t in m.token_ids] == alone[0], index
        assert "".join(m.text for m in messages) == alone[1]
        assert messages[-1].usage.completion_tokens == len(alone[0])
    assert len({tuple(t for m in ms for t in m.token_ids) for ms in completions.values()}) > 1, "seeds differ"


def test_the_prompt_is_prefilled_once_the_others_find_it_cached(stack):
    prompt = "Seven unrelated words first: " + PROMPT  # no other test sends it: nothing of it is cached before
    replies = list(stack.gateway.Generate(request(prompt, max_new_tokens=4, n=3), timeout=300))
    last = {r.index: r for r in replies if r.finish_reason}
    prompt_tokens = last[0].usage.prompt_tokens
    assert last[0].usage.cached_tokens == 0
    block = 16  # the stack's KV block size: every full block of the prompt is reused
    for index in (1, 2):
        assert last[index].usage.cached_tokens >= (prompt_tokens - 1) // block * block > 0, index


@pytest.mark.parametrize("n", [0, 17])
def test_n_outside_the_gateways_limit_is_invalid(stack, n):
    with pytest.raises(grpc.RpcError) as raised:
        collect(stack.gateway, request("Hi", max_new_tokens=2, n=n))
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "n must be in [1, 16]" in raised.value.details()


def test_complete_refuses_more_than_one_completion(stack):
    with pytest.raises(grpc.RpcError) as raised:
        stack.gateway.Complete(request("Hi", max_new_tokens=2, n=2), timeout=30)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "Complete returns one" in raised.value.details()
