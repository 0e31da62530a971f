"""A Mixtral checkpoint written by transformers' save_pretrained, served by the real stack (`pdserve up`):
greedy output equals transformers' greedy generate token for token, and the decode tier's Stats report, per
layer, the tokens its router sent to each expert, exactly as the reference routes the tokens decoded.

The vocabulary is the default model's (49,152) so its tokenizer serves this checkpoint; hidden size 64 keeps it
fast."""

import grpc
import pytest
import torch
from helpers import collect, request
from stack import internal_channel, launch_stack, stop_stack
from tiny_mixtral import build_tiny_mixtral, hf_expert_counts

from pdserve.v1 import decode_pb2, decode_pb2_grpc, gateway_pb2_grpc

MAX_NEW_TOKENS = 12
PROMPTS = ["The capital of France is", "def fibonacci(n):\n    ", "Once upon a time, in a small village"]
EOS = 2  # MixtralConfig's eos_token_id, in the generation_config.json save_pretrained writes


@pytest.fixture(scope="module")
def mixtral(model_dir, tmp_path_factory):
    from transformers import AutoTokenizer

    mixtral_dir = tmp_path_factory.mktemp("mixtral-stack")
    hf = build_tiny_mixtral(mixtral_dir, vocab_size=49152, tokenizer_from=model_dir)
    process, addresses = launch_stack(mixtral_dir)
    channels = [grpc.insecure_channel(addresses["gateway"]), internal_channel(addresses["decode"])]
    yield (hf, AutoTokenizer.from_pretrained(mixtral_dir), gateway_pb2_grpc.GatewayStub(channels[0]),
           decode_pb2_grpc.DecodeStub(channels[1]))
    for channel in channels:
        channel.close()
    stop_stack(process)


def _hf_greedy(hf, prompt_ids: list[int]) -> list[int]:
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt_ids]), max_new_tokens=MAX_NEW_TOKENS, do_sample=False,
                          eos_token_id=EOS, pad_token_id=EOS, attention_mask=torch.ones(1, len(prompt_ids)))
    return out[0, len(prompt_ids):].tolist()


def test_greedy_output_and_decode_expert_load_equal_transformers(mixtral):
    hf, tokenizer, gateway, decode = mixtral
    before = decode.Stats(decode_pb2.StatsRequest(), timeout=10)
    expected_load = torch.zeros(2, 4, dtype=torch.long)
    for prompt in PROMPTS:
        prompt_ids = tokenizer(prompt).input_ids
        expected = _hf_greedy(hf, prompt_ids)
        assert len(expected) == MAX_NEW_TOKENS and EOS not in expected  # every token a decode step's work

        token_ids, _, last = collect(gateway, request(prompt, max_new_tokens=MAX_NEW_TOKENS))

        assert token_ids == expected, prompt
        assert last.usage.prompt_tokens == len(prompt_ids)
        # The prefill tier samples the first token; decode steps take it and the others but the last as inputs.
        expected_load += torch.tensor(hf_expert_counts(hf, prompt_ids + expected[:-1], slice(len(prompt_ids), None)))
    stats = decode.Stats(decode_pb2.StatsRequest(), timeout=10)
    num_decoded = stats.num_tokens_generated - before.num_tokens_generated
    assert num_decoded == len(PROMPTS) * (MAX_NEW_TOKENS - 1)
    assert [load.layer for load in stats.expert_load] == [0, 1]
    counts = torch.tensor([list(load.tokens_per_expert) for load in stats.expert_load])
    before_counts = torch.tensor([list(load.tokens_per_expert) for load in before.expert_load] or [[0] * 4] * 2)
    assert (counts - before_counts).tolist() == expected_load.tolist()
    assert (counts - before_counts).sum(dim=1).tolist() == [num_decoded * 2] * 2  # top-2 routing
