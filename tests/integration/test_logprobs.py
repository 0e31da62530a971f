"""Log-probabilities through the running stack (speculation on: the first token's come from prefill, the rest from
decode, accepted drafts included) against transformers' log-softmax of its logits on the same weights in float64.
The service computes in float32: its logits lie within one decoder bound of the exact ones
(tests/support/bounds.py), and log-softmax moves by at most twice the largest change of its inputs."""

import grpc
import pytest
import torch
from bounds import decoder_tolerance
from helpers import collect, request

from common.basics.model_config import ModelConfig
from pdserve.v1 import common_pb2, gateway_pb2

PROMPT = "The capital of France is Paris. The capital of Italy is"
TOP_N = 5


def replies_of(stack, sampling: common_pb2.SamplingParams, max_new_tokens: int = 12):
    replies = list(stack.gateway.Generate(request(PROMPT, max_new_tokens=max_new_tokens, sampling=sampling),
                                          timeout=120))
    tokens = [t for r in replies for t in r.token_ids]
    logprobs = [lp for r in replies for lp in r.logprobs]
    return tokens, logprobs


def reference(hf_model_f64, prompt_ids: list[int], tokens: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, log-softmax), each (len(tokens), vocab) in float64, at each generated position, teacher-forced."""
    with torch.no_grad():
        logits = hf_model_f64(torch.tensor([prompt_ids + tokens])).logits[0, len(prompt_ids) - 1:-1]
    return logits, torch.log_softmax(logits, dim=-1)


@pytest.mark.parametrize("sampling", [common_pb2.SamplingParams(logprobs=TOP_N),
                                      common_pb2.SamplingParams(logprobs=TOP_N, temperature=0.8, seed=11)],
                         ids=["greedy", "sampled"])
def test_logprobs_equal_transformers_log_softmax_within_the_float32_bound(stack, hf_model, hf_model_f64, model_dir,
                                                                          sampling):
    config = ModelConfig.from_dir(model_dir)
    prompt_ids = hf_model[1](PROMPT).input_ids
    tokens, logprobs = replies_of(stack, sampling)
    assert len(logprobs) == len(tokens) >= 2
    logits, exact = reference(hf_model_f64, prompt_ids, tokens)
    for i, (token, got) in enumerate(zip(tokens, logprobs)):
        bound = 2 * decoder_tolerance(config, logits[i])
        assert abs(got.logprob - float(exact[i, token])) <= bound, (i, got.logprob, float(exact[i, token]), bound)
        assert len(got.top) == TOP_N
        for alternative in got.top:
            assert abs(alternative.logprob - float(exact[i, alternative.token_id])) <= bound
        reported = [a.logprob for a in got.top]
        assert reported == sorted(reported, reverse=True)
        # the reported five are the five most likely, up to ties closer than the bounds of both sides
        fifth = float(exact[i].topk(TOP_N).values[-1])
        assert min(reported) >= fifth - 2 * bound
        if not sampling.HasField("temperature"):
            assert got.top[0].token_id == token  # greedy: the chosen token is the most likely one


def test_zero_alternatives_give_the_chosen_tokens_only_and_unset_gives_none(stack):
    tokens, logprobs = replies_of(stack, common_pb2.SamplingParams(logprobs=0), max_new_tokens=4)
    assert len(logprobs) == len(tokens) and all(not lp.top and lp.logprob <= 0 for lp in logprobs)
    _, none = replies_of(stack, common_pb2.SamplingParams(), max_new_tokens=4)
    assert none == []


def test_complete_carries_every_tokens_logprob(stack):
    whole = stack.gateway.Complete(request(PROMPT, max_new_tokens=6, sampling=common_pb2.SamplingParams(logprobs=2)),
                                   timeout=120)
    assert len(whole.logprobs) == len(whole.token_ids) == 6


def test_more_alternatives_than_the_gateway_allows_is_invalid(stack):
    limit = stack.gateway.GetModelInfo(gateway_pb2.ModelInfoRequest(), timeout=30).max_logprobs
    with pytest.raises(grpc.RpcError) as raised:
        collect(stack.gateway, request("Hi", max_new_tokens=2,
                                       sampling=common_pb2.SamplingParams(logprobs=limit + 1)))
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"exceeds this gateway's limit of {limit}" in raised.value.details()
