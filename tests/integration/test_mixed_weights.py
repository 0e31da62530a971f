"""Mixed tiers: an fp32 prefill tier hands its KV to an int4-AWQ decode tier, and the service streams
exactly what those two models compute in process (fp32 prefill, then int4-AWQ greedy decode over that KV);
`pdserve up --prefill-weights/--decode-weights` reach the tiers."""

import pytest
import torch

from common.cli import build_parser
from common.kv_pool import KvPool
from common.launcher import tier_commands
from common.model.runner import DecodeItem, ModelRunner, PrefillChunk
from common.model.weights import load_model, prepare_weights
from common.tokenizer import TextTokenizer
from stack import launch_stack, stop_stack

from helpers import collect, request

DECODE_WEIGHTS = "int4-awq"
MAX_NEW_TOKENS = 16
PROMPTS = ["The capital of France is", "def fibonacci(n):\n    ",
           "Once upon a time, in a small village by the sea, there lived"]


def test_up_passes_each_tiers_weight_format(tmp_path):
    args = build_parser(tmp_path).parse_args(["up", "--decode-weights", "int4-awq", "--prefill-weights", "fp16"])
    commands = tier_commands(args, 1, 2)
    for tier, expected in (("decode", "int4-awq"), ("prefill", "fp16")):
        flag = commands[tier].index("--weights")
        assert commands[tier][flag + 1] == expected
    assert "--weights" not in commands["gateway"]


def test_up_colocated_passes_its_one_weight_format_and_refuses_two(tmp_path):
    parser = build_parser(tmp_path)
    commands = tier_commands(parser.parse_args(["up", "--colocated", "--prefill-weights", "fp16",
                                                "--decode-weights", "fp16"]), 1, 2)
    colocated = commands["colocated"]
    assert colocated[colocated.index("--weights") + 1] == "fp16"
    assert parser.parse_args(colocated[colocated.index("colocated"):]).weights == "fp16"
    with pytest.raises(ValueError, match="one copy of the weights"):
        tier_commands(parser.parse_args(["up", "--colocated", "--decode-weights", "fp16"]), 1, 2)


def _runner(model_dir, weights: str) -> ModelRunner:
    model = load_model(model_dir, weights)
    c = model.config
    return ModelRunner(model, KvPool(num_layers=c.num_layers, num_blocks=8, block_size=16,
                                     num_kv_heads=c.num_kv_heads, head_dim=c.head_dim, dtype=torch.float32))


def _greedy(prefill: ModelRunner, decode: ModelRunner, ids: list[int], eos: set[int]) -> list[int]:
    table = list(range(-(-(len(ids) + MAX_NEW_TOKENS) // 16)))
    out = [int(prefill.run_prefill([PrefillChunk(ids, 0, table)])[0].argmax())]
    decode.kv.key.copy_(prefill.kv.key)  # the KV the prefill tier pushes
    decode.kv.value.copy_(prefill.kv.value)
    while len(out) < MAX_NEW_TOKENS and out[-1] not in eos:
        out.append(int(decode.run_decode([DecodeItem(out[-1], len(ids) + len(out) - 1, table)])[0].argmax()))
    return out


@pytest.fixture(scope="module")
def mixed_stack(model_dir):
    prepare_weights(model_dir, DECODE_WEIGHTS)  # calibrate once, outside the stack's start-up timeout
    process, addresses = launch_stack(model_dir, "--prefill-weights", "fp32", "--decode-weights", DECODE_WEIGHTS)
    import grpc

    from pdserve.v1 import gateway_pb2_grpc

    channel = grpc.insecure_channel(addresses["gateway"])
    yield gateway_pb2_grpc.GatewayStub(channel)
    channel.close()
    stop_stack(process)


def test_fp32_prefill_with_int4_awq_decode_serves_what_the_two_models_compute(model_dir, mixed_stack):
    tokenizer = TextTokenizer(model_dir)
    fp32, int4 = _runner(model_dir, "fp32"), _runner(model_dir, DECODE_WEIGHTS)
    eos = set(fp32.model.config.eos_token_ids)
    expected = {p: _greedy(fp32, int4, tokenizer.encode(p), eos) for p in PROMPTS}
    fp32_only = {p: _greedy(fp32, fp32, tokenizer.encode(p), eos) for p in PROMPTS}
    assert expected != fp32_only, "these prompts no longer tell an int4 decode tier from an fp32 one"
    for prompt in PROMPTS:
        token_ids, _, _ = collect(mixed_stack, request(prompt, max_new_tokens=MAX_NEW_TOKENS))
        assert [t for t in token_ids if t not in eos] == [t for t in expected[prompt] if t not in eos], prompt
