"""The gateway's calls besides Generate, through the running stack: Complete (Generate without streaming),
Tokenize and Detokenize (checked against transformers' tokenizer of the same checkpoint) and GetModelInfo."""

import grpc
import pytest
from helpers import request
from stack import STACK_BLOCK_SIZE

from common.basics.model_config import ModelConfig
from pdserve.v1 import gateway_pb2

CHAT = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a prime number."}]


@pytest.fixture(scope="module")
def hf_tokenizer(model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


def chat_request() -> gateway_pb2.TokenizeRequest:
    tokenize = gateway_pb2.TokenizeRequest()
    for turn in CHAT:
        tokenize.messages.messages.add(**turn)
    return tokenize


def test_tokenize_equals_the_checkpoints_own_tokenizer_and_chat_template(stack, hf_tokenizer, model_dir):
    text = "Tokenizers split text: naïve café, 東京, emoji 🚀 and code `x += 1`."
    reply = stack.gateway.Tokenize(gateway_pb2.TokenizeRequest(prompt=text), timeout=30)
    assert list(reply.token_ids) == hf_tokenizer(text).input_ids
    assert reply.max_context == ModelConfig.from_dir(model_dir).max_position_embeddings
    chat = stack.gateway.Tokenize(chat_request(), timeout=30)
    assert list(chat.token_ids) == hf_tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=True,
                                                                    return_dict=False)


def test_detokenize_inverts_tokenize_and_keeps_special_tokens_when_asked(stack, hf_tokenizer):
    text = "Round trip: naïve café, 東京 🚀."
    ids = stack.gateway.Tokenize(gateway_pb2.TokenizeRequest(prompt=text), timeout=30).token_ids
    assert stack.gateway.Detokenize(gateway_pb2.DetokenizeRequest(token_ids=ids), timeout=30).text == text
    chat_ids = list(stack.gateway.Tokenize(chat_request(), timeout=30).token_ids)
    kept = stack.gateway.Detokenize(gateway_pb2.DetokenizeRequest(token_ids=chat_ids, keep_special_tokens=True),
                                    timeout=30).text
    assert kept == hf_tokenizer.decode(chat_ids, skip_special_tokens=False) and "<|im_start|>" in kept
    plain = stack.gateway.Detokenize(gateway_pb2.DetokenizeRequest(token_ids=chat_ids), timeout=30).text
    assert plain == hf_tokenizer.decode(chat_ids, skip_special_tokens=True) and "<|im_start|>" not in plain


def test_complete_is_the_generate_stream_in_one_reply(stack):
    req = request("The capital of France is", max_new_tokens=12)
    streamed = list(stack.gateway.Generate(req, timeout=120))
    whole = stack.gateway.Complete(req, timeout=120)
    assert list(whole.token_ids) == [i for reply in streamed for i in reply.token_ids]
    assert whole.text == "".join(reply.text for reply in streamed)
    assert whole.finish_reason == streamed[-1].finish_reason
    assert whole.usage.completion_tokens == len(whole.token_ids) == 12
    assert whole.usage.prompt_tokens == streamed[-1].usage.prompt_tokens
    assert whole.timings.time_to_first_token_ms > 0


def test_model_info_names_the_model_its_limits_and_every_instance(stack, model_dir):
    config = ModelConfig.from_dir(model_dir)
    info = stack.gateway.GetModelInfo(gateway_pb2.ModelInfoRequest(), timeout=30)
    assert info.model_id == model_dir.name
    assert info.context_length == config.max_position_embeddings
    assert info.vocab_size == 49152 and list(info.eos_token_ids) == list(config.eos_token_ids)
    assert info.max_new_tokens_limit >= info.default_max_new_tokens >= 1 and info.max_stop_strings == 16
    assert [(i.tier, i.address) for i in info.instances] == [("prefill", stack.prefill_address),
                                                             ("decode", stack.decode_address)]
    for instance in info.instances:
        assert instance.in_rotation
        assert (instance.weight_format, instance.kv_dtype, instance.block_size) == ("fp32", "float32",
                                                                                    STACK_BLOCK_SIZE)


@pytest.mark.parametrize("call, message, expected", [
    ("Tokenize", gateway_pb2.TokenizeRequest(), "set one of prompt or messages"),
    ("Tokenize", gateway_pb2.TokenizeRequest(prompt="x" * 700_000), "more than the model's context"),
    ("Detokenize", gateway_pb2.DetokenizeRequest(token_ids=[1, 49152]), "outside the vocabulary"),
    ("Detokenize", gateway_pb2.DetokenizeRequest(token_ids=[1] * 8193), "at most the model's context of 8192"),
    ("Complete", request("Hi", max_new_tokens=0), "max_new_tokens must be at least 1"),
])
def test_bad_input_to_the_other_calls_is_invalid_argument(stack, call, message, expected):
    with pytest.raises(grpc.RpcError) as raised:
        getattr(stack.gateway, call)(message, timeout=30)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert expected in raised.value.details()
