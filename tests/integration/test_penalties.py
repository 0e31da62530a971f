"""Penalties and the minimum length through the running stack (speculation on), against a greedy loop over
transformers on the same weights that applies transformers' own logits processors (repetition penalty, minimum
length) or OpenAI's definition (presence and frequency penalties). Tokens are compared up to the first step
whose top two shaped logits lie closer than four float32 decoder bounds (tests/support/bounds.py)."""

import pytest
import torch
from bounds import decoder_tolerance
from helpers import collect, request
from transformers.generation.logits_process import (
    MinNewTokensLengthLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
)

from common.basics.model_config import ModelConfig
from pdserve.v1 import common_pb2

PROMPT = "List the days of the week, then list them again:"
MAX_NEW_TOKENS = 24
CHAT = [("user", "Say hello in one short sentence.")]
CHAT_MAX_NEW_TOKENS = 40


def openai_penalties(presence: float, frequency: float, prompt_len: int):
    def process(input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        output = input_ids[0, prompt_len:].tolist()
        shaped = scores.double()
        for token in set(output):
            shaped[0, token] -= presence + frequency * output.count(token)
        return shaped
    return process


def reference_greedy(hf_model, model_dir, prompt_ids: list[int], max_new_tokens: int, process, eos: set[int]):
    """(tokens, how many of them are decided: every step before the first near-tie of the shaped logits)."""
    model = hf_model[0]
    config = ModelConfig.from_dir(model_dir)
    ids, decided = list(prompt_ids), None
    with torch.no_grad():
        for step in range(max_new_tokens):
            raw = model(torch.tensor([ids])).logits[:, -1].float()  # (1, vocab)
            shaped = process(torch.tensor([ids]), raw.clone())[0]
            top2 = shaped.topk(2).values
            if decided is None and float(top2[0] - top2[1]) <= 4 * decoder_tolerance(config, raw[0]):
                decided = step
            ids.append(int(shaped.argmax()))
            if ids[-1] in eos:
                break
    out = ids[len(prompt_ids):]
    return out, len(out) if decided is None else decided


def assert_matches(got: list[int], expected: list[int], kept: int) -> None:
    assert kept >= len(expected) // 2, f"near-ties from token {kept}: choose another prompt"
    assert got[:kept] == expected[:kept], (got, expected, kept)
    if kept == len(expected):
        assert got == expected


@pytest.mark.parametrize("sampling, process", [
    ({"repetition_penalty": 1.5}, lambda n: RepetitionPenaltyLogitsProcessor(1.5)),
    ({"frequency_penalty": 2.0, "presence_penalty": 0.5}, lambda n: openai_penalties(0.5, 2.0, n)),
], ids=["repetition", "frequency-and-presence"])
def test_penalised_greedy_output_equals_the_reference(stack, hf_model, model_dir, sampling, process):
    prompt_ids = hf_model[1](PROMPT).input_ids
    eos = set(ModelConfig.from_dir(model_dir).eos_token_ids)
    plain, _, _ = collect(stack.gateway, request(PROMPT, max_new_tokens=MAX_NEW_TOKENS))
    got, _, _ = collect(stack.gateway, request(PROMPT, max_new_tokens=MAX_NEW_TOKENS,
                                                sampling=common_pb2.SamplingParams(**sampling)))
    expected, kept = reference_greedy(hf_model, model_dir, prompt_ids, MAX_NEW_TOKENS, process(len(prompt_ids)), eos)
    assert_matches(got, expected, kept)
    assert got != plain, "the penalty changed nothing on this prompt: choose another"


def test_min_new_tokens_holds_back_eos_as_transformers_does(stack, hf_model, model_dir):
    eos = set(ModelConfig.from_dir(model_dir).eos_token_ids)
    ended, _, _ = collect(stack.gateway, request(messages=CHAT, max_new_tokens=CHAT_MAX_NEW_TOKENS))
    assert ended[-1] in eos and len(ended) < CHAT_MAX_NEW_TOKENS - 6
    minimum = len(ended) + 4
    got, _, last = collect(stack.gateway, request(messages=CHAT, max_new_tokens=CHAT_MAX_NEW_TOKENS,
                                                  sampling=common_pb2.SamplingParams(min_new_tokens=minimum)))
    assert len(got) >= minimum and not eos & set(got[:minimum])
    messages = [{"role": role, "content": content} for role, content in CHAT]
    prompt_ids = hf_model[1].apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                 return_dict=False)
    process = MinNewTokensLengthLogitsProcessor(len(prompt_ids), minimum, sorted(eos))
    expected, kept = reference_greedy(hf_model, model_dir, prompt_ids, CHAT_MAX_NEW_TOKENS, process, eos)
    assert_matches(got, expected, kept)


def test_min_new_tokens_above_max_new_tokens_is_invalid(stack):
    import grpc

    with pytest.raises(grpc.RpcError) as raised:
        collect(stack.gateway, request("Hi", max_new_tokens=4, sampling=common_pb2.SamplingParams(min_new_tokens=5)))
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "min_new_tokens 5 exceeds max_new_tokens 4" in raised.value.details()
