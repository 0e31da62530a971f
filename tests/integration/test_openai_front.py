"""The OpenAI-compatible HTTP front, driven by the official `openai` package: a second gateway, with API keys and
its HTTP port on, in front of the stack's tiers. What the front returns equals what the gRPC API returns for the
same request (greedy, so both are deterministic); keys, validation and refusals are the gRPC edge's, as HTTP."""

import http.client
import json
import time

import jsonschema
import openai
import pytest
import torch
from bounds import decoder_tolerance
from helpers import collect, request
from prometheus_client import CollectorRegistry
from stack import CERTS_DIR

from common.basics.config import GatewayConfig
from common.basics.model_config import ModelConfig
from common.edge.auth import KeyLimits
from gateway.server import start_gateway
from pdserve.certs import ensure_certs
from pdserve.keys import add_key
from pdserve.v1 import common_pb2

PROMPT = "The capital of France is"
CHAT = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name three primary colors."}]
GREEDY = common_pb2.SamplingParams(temperature=0.0)


@pytest.fixture(scope="module")
def front(stack, model_dir, tmp_path_factory):
    """(gateway, openai client with a key, the key, the HTTP base URL); the gateway's metrics in a registry of
    its own (gateway.registry)."""
    keys_file = tmp_path_factory.mktemp("keys") / "keys"
    secret = add_key(keys_file, "openai", KeyLimits())
    certs = ensure_certs(CERTS_DIR)
    cert, key = certs.for_tier("gateway")
    gateway = start_gateway(GatewayConfig(model_dir=model_dir, port=0, http_port=0,
                                          prefill_addresses=(stack.prefill_address,),
                                          decode_addresses=(stack.decode_address,), tls_cert=cert, tls_key=key,
                                          tls_ca=certs.ca, api_keys_file=keys_file), registry := CollectorRegistry())
    gateway.registry = registry
    base_url = f"http://127.0.0.1:{gateway.http_port}/v1"
    client = openai.OpenAI(base_url=base_url, api_key=secret, max_retries=0, timeout=120)
    yield gateway, client, secret, base_url
    gateway.stop()


def test_models_names_the_served_model_and_asks_for_a_key(front, model_dir):
    _, client, _, base_url = front
    assert [m.id for m in client.models.list().data] == [model_dir.name]
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=base_url, api_key="pdk_not-a-key", max_retries=0).models.list()


def test_completion_equals_the_grpc_output(front, stack, model_dir):
    _, client, _, _ = front
    tokens, text, last = collect(stack.gateway, request(PROMPT, max_new_tokens=12, sampling=GREEDY))
    reply = client.completions.create(model=model_dir.name, prompt=PROMPT, max_tokens=12, temperature=0)
    assert reply.choices[0].text == text
    assert reply.choices[0].finish_reason == "length"
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (last.usage.prompt_tokens, len(tokens))

    streamed = client.completions.create(model=model_dir.name, prompt=PROMPT, max_tokens=12, temperature=0,
                                         stream=True, stream_options={"include_usage": True})
    chunks = list(streamed)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == len(tokens)


def test_chat_completion_equals_the_grpc_output_streamed_and_not(front, stack, model_dir):
    _, client, _, _ = front
    grpc_request = request(messages=[(m["role"], m["content"]) for m in CHAT], max_new_tokens=24, sampling=GREEDY)
    _, text, last = collect(stack.gateway, grpc_request)
    reason = "stop" if last.finish_reason == common_pb2.FINISH_REASON_STOP else "length"
    reply = client.chat.completions.create(model=model_dir.name, messages=CHAT, max_tokens=24, temperature=0)
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].message.content == text and reply.choices[0].finish_reason == reason
    assert reply.usage.prompt_tokens == last.usage.prompt_tokens

    chunks = list(client.chat.completions.create(model=model_dir.name, messages=CHAT, max_tokens=24, temperature=0,
                                                 stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == text
    assert chunks[-1].choices[0].finish_reason == reason


def test_logprobs_equal_the_grpc_apis_chat_and_completions(front, stack, hf_model, model_dir):
    """The same numbers as gRPC's for the same greedy request, up to the float32 bound (the two calls may meet
    different batches and prefix-cache hits, so their sums may round differently)."""
    _, client, _, _ = front
    config = ModelConfig.from_dir(model_dir)
    sampling = common_pb2.SamplingParams(temperature=0.0, logprobs=3)
    replies = list(stack.gateway.Generate(request(PROMPT, max_new_tokens=6, sampling=sampling), timeout=120))
    tokens = [t for r in replies for t in r.token_ids]
    expected = [lp for r in replies for lp in r.logprobs]
    prompt_ids = hf_model[1](PROMPT).input_ids
    with torch.no_grad():
        logits = hf_model[0](torch.tensor([prompt_ids + tokens])).logits[0, len(prompt_ids) - 1:-1]
    bounds = [4 * decoder_tolerance(config, row) for row in logits]

    text_of = {t: hf_model[1].decode([t]) for lp in expected for t in [*(a.token_id for a in lp.top)]}
    reply = client.completions.create(model=model_dir.name, prompt=PROMPT, max_tokens=6, temperature=0, logprobs=3)
    got = reply.choices[0].logprobs
    assert got.tokens == [hf_model[1].decode([t]) for t in tokens]
    for i, lp in enumerate(expected):
        assert abs(got.token_logprobs[i] - lp.logprob) <= bounds[i]
        assert set(got.top_logprobs[i]) == {text_of[a.token_id] for a in lp.top}

    chat = client.chat.completions.create(model=model_dir.name, messages=CHAT, max_tokens=6, temperature=0,
                                          logprobs=True, top_logprobs=2)
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens and all(len(c.top_logprobs) == 2 for c in content)
    assert all(c.logprob <= 0 and c.top_logprobs[0].logprob >= c.logprob - 1e-6 for c in content)
    streamed = list(client.chat.completions.create(model=model_dir.name, messages=CHAT, max_tokens=6, temperature=0,
                                                   logprobs=True, stream=True))
    assert sum(len(c.choices[0].logprobs.content) for c in streamed if c.choices[0].logprobs) == len(content)


def test_n_choices_equal_single_grpc_requests_with_seed_plus_index(front, stack, model_dir):
    _, client, _, _ = front
    reply = client.chat.completions.create(model=model_dir.name, messages=CHAT, max_tokens=8, temperature=0.9,
                                           seed=77, n=3)
    assert [c.index for c in reply.choices] == [0, 1, 2]
    for choice in reply.choices:
        sampling = common_pb2.SamplingParams(temperature=0.9, seed=77 + choice.index)
        alone = collect(stack.gateway, request(messages=[(m["role"], m["content"]) for m in CHAT], max_new_tokens=8,
                                               sampling=sampling))
        assert choice.message.content == alone[1]
    streamed = list(client.chat.completions.create(model=model_dir.name, messages=CHAT, max_tokens=8, temperature=0.9,
                                                   seed=77, n=3, stream=True))
    texts = {i: "".join(c.choices[0].delta.content or "" for c in streamed if c.choices[0].index == i)
             for i in range(3)}
    assert texts == {c.index: c.message.content for c in reply.choices}


def test_a_json_schema_response_format_validates_and_equals_the_grpc_output(front, stack, model_dir):
    _, client, _, _ = front
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 24},
                                               "country": {"type": "string", "maxLength": 24}},
              "required": ["city", "country"], "additionalProperties": False}
    messages = [{"role": "system", "content": "Answer with JSON only."}, {"role": "user", "content": "Where is Rome?"}]
    reply = client.chat.completions.create(
        model=model_dir.name, messages=messages, max_tokens=80, temperature=0, logprobs=True,
        response_format={"type": "json_schema", "json_schema": {"name": "place", "schema": schema, "strict": True}})
    content = reply.choices[0].message.content
    jsonschema.validate(json.loads(content), schema)
    grpc_request = request(messages=[(m["role"], m["content"]) for m in messages], max_new_tokens=80, sampling=GREEDY)
    grpc_request.response_format.json_schema = json.dumps(schema)
    assert content == collect(stack.gateway, grpc_request)[1]
    assert len(reply.choices[0].logprobs.content) == reply.usage.completion_tokens


def test_pdserve_extensions_travel_in_extra_body(front, model_dir):
    _, client, _, _ = front
    reply = client.chat.completions.create(model=model_dir.name, messages=CHAT, max_tokens=40, temperature=0,
                                           extra_body={"ignore_eos": True, "top_k": 5, "repetition_penalty": 1.1})
    assert reply.usage.completion_tokens == 40 and reply.choices[0].finish_reason == "length"


@pytest.mark.parametrize("extra, named", [
    ({"extra_body": {"best_of": 2}}, "best_of"),
    ({"response_format": {"type": "xml"}}, "response_format"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}, "tools"),
    ({"logit_bias": {"1": 5}}, "logit_bias"),
    ({"user": "someone"}, "user"),
])
def test_unsupported_parameters_are_refused_by_name(front, model_dir, extra, named):
    _, client, _, _ = front
    with pytest.raises(openai.BadRequestError) as raised:
        client.chat.completions.create(model=model_dir.name, messages=CHAT, max_tokens=4, **extra)
    assert raised.value.status_code == 400 and named in raised.value.message
    assert raised.value.body["param"] == named


@pytest.mark.parametrize("kwargs, message", [
    ({"temperature": -1.0}, "temperature must be"),
    ({"max_tokens": 5000}, "exceeds this gateway's limit"),
    ({"model": "gpt-4o"}, "is not served here"),
    ({"extra_body": {"min_tokens": 50}, "max_tokens": 4}, "min_new_tokens 50 exceeds max_new_tokens 4"),
])
def test_bad_values_get_the_grpc_edges_message_as_400(front, model_dir, kwargs, message):
    _, client, _, _ = front
    kwargs = {"model": model_dir.name, "max_tokens": 4, **kwargs}
    with pytest.raises(openai.BadRequestError) as raised:
        client.completions.create(prompt=PROMPT, **kwargs)
    assert message in raised.value.message


def test_a_stream_the_client_drops_is_cancelled_and_gives_back_its_kv(front, stack, model_dir):
    gateway, _, secret, base_url = front
    registry = gateway.registry

    def output_tokens() -> float:
        return registry.get_sample_value("pdserve_gateway_tokens_total", {"gen_ai_token_type": "output"}) or 0.0

    free, before = stack.decode_stats().num_blocks_free, output_tokens()
    body = {"model": model_dir.name, "prompt": PROMPT, "max_tokens": 2000, "temperature": 0, "stream": True,
            "ignore_eos": True}
    connection = http.client.HTTPConnection(base_url.split("/")[2], timeout=60)
    connection.request("POST", "/v1/completions", body=json.dumps(body),
                       headers={"authorization": f"Bearer {secret}", "content-type": "application/json"})
    response = connection.getresponse()
    assert response.status == 200
    assert response.readline().startswith(b"data:")  # the stream has begun
    connection.close()  # the client goes away mid-stream
    deadline = time.monotonic() + 60
    while (registry.get_sample_value("pdserve_gateway_requests_in_flight") or stack.decode_stats().num_blocks_free
           < free) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert registry.get_sample_value("pdserve_gateway_requests_in_flight") == 0
    assert stack.decode_stats().num_blocks_free >= free
    assert output_tokens() - before < 2000, "the dropped request ran to its end"
    assert collect(stack.gateway, request(PROMPT, max_new_tokens=2))[0]  # and the service goes on serving
