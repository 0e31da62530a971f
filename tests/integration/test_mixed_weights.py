"""Mixed tiers: an fp32 prefill tier hands its KV to an int4-AWQ decode tier, and the service streams
exactly what those two models compute, as transformers computes them in float64 (fp32 weights over the
prompt, then int4-AWQ greedy decoding over that KV); `pdserve up --prefill-weights/--decode-weights` reach the
tiers. The stack moves its KV over --kv-transport nixl where NIXL is installed (`make test` installs it; the float32
and int8 stacks of the other modules cover gRPC), so mixed weights are checked over the NIXL path too."""

import pytest
import torch
from bounds import decoder_tolerance
from helpers import collect, request
from stack import launch_stack, stop_stack
from transformers import DynamicCache

from common.basics.model_config import ModelConfig
from common.basics.tokenizer import TextTokenizer
from common.kv.nixl_transport import nixl_installed
from common.model.packed import PackedWeight
from common.model.weights import prepare_weights
from pdserve.cli import build_parser
from pdserve.launcher import tier_commands

DECODE_WEIGHTS = "int4-awq"
MAX_NEW_TOKENS = 16
PROMPTS = ["The capital of France is", "def fibonacci(n):\n    ",
           "Once upon a time, in a small village by the sea, there lived"]


def test_up_passes_each_tiers_weight_format(tmp_path):
    args = build_parser(tmp_path).parse_args(["up", "--decode-weights", "int4-awq", "--prefill-weights", "fp16"])
    commands = tier_commands(args, [1], [2])
    for tier, expected in (("decode-0", "int4-awq"), ("prefill-0", "fp16")):
        flag = commands[tier].index("--weights")
        assert commands[tier][flag + 1] == expected
    assert "--weights" not in commands["gateway"]


def test_up_colocated_passes_its_one_weight_format_and_refuses_two(tmp_path):
    parser = build_parser(tmp_path)
    commands = tier_commands(parser.parse_args(["up", "--colocated", "--prefill-weights", "fp16",
                                                "--decode-weights", "fp16"]), [1], [2])
    colocated = commands["colocated"]
    assert colocated[colocated.index("--weights") + 1] == "fp16"
    assert parser.parse_args(colocated[colocated.index("colocated"):]).weights == "fp16"
    with pytest.raises(ValueError, match="one copy of the weights"):
        tier_commands(parser.parse_args(["up", "--colocated", "--decode-weights", "fp16"]), [1], [2])


def _float64_model(model_dir, weights: str):
    """transformers in float64 holding the tier format's weights as the format reads them back (dequantised
    rows; AWQ's scales already folded into the norms): an independent forward of what that tier computes."""
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float64).eval()
    if weights != "fp32":
        state = {name: (w.dequantize_rows() if isinstance(w, PackedWeight) else w).double()
                 for name, w in prepare_weights(model_dir, weights).items()}
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
        model.load_state_dict(state)
    return model


def _mixed_greedy(prefill, decode, ids: list[int], config: ModelConfig) -> tuple[list[int], list[float]]:
    """Greedy tokens (EOS included) of `prefill` over the prompt, then `decode` over the KV prefill left, and
    how far each choice is from being a float32 near-tie: its top-2 margin less twice the float32 decoder
    bound at that step's logits (tests/bounds.py)."""
    cache, tokens, slack = DynamicCache(), [], []
    eos = set(config.eos_token_ids)

    def choose(logits: torch.Tensor) -> None:
        top2 = logits.topk(2)
        tokens.append(int(top2.indices[0]))
        slack.append(float(top2.values[0] - top2.values[1]) - 2 * decoder_tolerance(config, logits))

    with torch.no_grad():
        choose(prefill(torch.tensor([ids]), past_key_values=cache, use_cache=True).logits[0, -1])
        while len(tokens) < MAX_NEW_TOKENS and tokens[-1] not in eos:
            position = torch.tensor([[len(ids) + len(tokens) - 1]])
            choose(decode(torch.tensor([tokens[-1:]]), past_key_values=cache, use_cache=True,
                          position_ids=position).logits[0, -1])
    return tokens, slack


@pytest.fixture(scope="module")
def mixed_stack(model_dir):
    prepare_weights(model_dir, DECODE_WEIGHTS)  # calibrate once, outside the stack's start-up timeout
    transport = "nixl" if nixl_installed() else "grpc"
    process, addresses = launch_stack(model_dir, "--prefill-weights", "fp32", "--decode-weights", DECODE_WEIGHTS,
                                      "--kv-transport", transport)
    import grpc

    from pdserve.v1 import gateway_pb2_grpc

    channel = grpc.insecure_channel(addresses["gateway"])
    yield gateway_pb2_grpc.GatewayStub(channel)
    channel.close()
    stop_stack(process)


def test_fp32_prefill_with_int4_awq_decode_serves_what_the_two_models_compute(model_dir, mixed_stack):
    """The reference: transformers in float64, the prompt through the fp32 weights, then greedy decoding
    through the int4-AWQ weights over that KV. The stack (float32) may part from it only at a choice whose
    margin is within twice the float32 decoder bound (tests/bounds.py); EOS counts as a token."""
    tokenizer = TextTokenizer(model_dir)
    fp32, int4 = _float64_model(model_dir, "fp32"), _float64_model(model_dir, DECODE_WEIGHTS)
    config = ModelConfig.from_dir(model_dir)
    expected = {p: _mixed_greedy(fp32, int4, tokenizer.encode(p), config) for p in PROMPTS}
    fp32_only = {p: _mixed_greedy(fp32, fp32, tokenizer.encode(p), config)[0] for p in PROMPTS}
    assert [t for t, _ in expected.values()] != list(fp32_only.values()), \
        "these prompts no longer tell an int4 decode tier from an fp32 one"
    for prompt in PROMPTS:
        tokens, slack = expected[prompt]
        token_ids, _, _ = collect(mixed_stack, request(prompt, max_new_tokens=MAX_NEW_TOKENS))
        kept = next((i for i, room in enumerate(slack) if room <= 0), len(tokens))
        assert kept >= len(tokens) // 2, (prompt, slack)  # or these prompts have lost their power
        assert token_ids[:kept] == tokens[:kept], (prompt, token_ids, tokens)
        if kept == len(tokens):
            assert token_ids == tokens, prompt
