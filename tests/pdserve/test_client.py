"""The typed client (pdserve.client) against the running stack: each call's result equals the raw gRPC API's,
keyword arguments become the request's fields, and a gateway that is not up yet is retried within the deadline."""

import threading
import time

import grpc
import pytest
from helpers import collect, request
from stack import CERTS_DIR

from common.basics.config import GatewayConfig
from gateway.server import start_gateway
from pdserve.certs import ensure_certs
from pdserve.client import Client, build_request
from pdserve.launcher import free_port
from pdserve.v1 import common_pb2

PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def client(stack):
    with Client(stack.gateway_address, timeout_s=120) as client:
        yield client


def test_generate_and_complete_equal_the_raw_api(client, stack):
    tokens, text, last = collect(stack.gateway, request(PROMPT, max_new_tokens=8))
    chunks = list(client.generate(PROMPT, max_new_tokens=8))
    assert [t for c in chunks for t in c.token_ids] == tokens and "".join(c.text for c in chunks) == text
    assert chunks[-1].finish_reason == "length" and chunks[-1].usage.completion_tokens == 8
    whole = client.complete(PROMPT, max_new_tokens=8, logprobs=2)
    assert (whole.token_ids, whole.text) == (tokens, text) and len(whole.logprobs) == 8
    assert whole.usage.prompt_tokens == last.usage.prompt_tokens


def test_n_completions_come_back_whole_in_index_order(client):
    completions = client.generate_all(PROMPT, max_new_tokens=6, n=3, temperature=0.9, seed=5)
    assert [c.index for c in completions] == [0, 1, 2]
    for c in completions:
        alone = client.complete(PROMPT, max_new_tokens=6, temperature=0.9, seed=5 + c.index)
        assert c.token_ids == alone.token_ids and c.finish_reason == alone.finish_reason


def test_tokenize_detokenize_and_model_info(client, model_dir):
    ids = client.tokenize(PROMPT)
    assert client.detokenize(ids) == PROMPT
    assert client.tokenize(messages=[("user", "Hi")])[-1] != ids[-1]
    assert client.model_info().model_id == model_dir.name


def test_keyword_arguments_become_the_requests_fields():
    built = build_request(messages=[("user", "Hi")], max_new_tokens=5, temperature=0.5, seed=3, stop=["\n"],
                          stop_token_ids=[2], ignore_eos=True, n=2, logprobs=1, min_new_tokens=2,
                          repetition_penalty=1.1, response_format={"json_schema": {"type": "object"}})
    assert built.messages.messages[0].content == "Hi" and built.max_new_tokens == 5 and built.n == 2
    assert built.sampling == common_pb2.SamplingParams(temperature=0.5, seed=3, logprobs=1, min_new_tokens=2,
                                                       repetition_penalty=1.1)
    assert list(built.stop) == ["\n"] and list(built.stop_token_ids) == [2] and built.ignore_eos
    assert built.response_format.json_schema == '{"type": "object"}'
    with pytest.raises(ValueError, match="exactly one of prompt, messages or token_ids"):
        build_request("a", token_ids=[1])


def test_a_gateway_not_up_yet_is_retried_until_it_answers(stack, model_dir):
    port = free_port("127.0.0.1")
    certs = ensure_certs(CERTS_DIR)
    cert, key = certs.for_tier("gateway")
    started = []

    def start_late() -> None:
        time.sleep(1.0)
        started.append(start_gateway(GatewayConfig(
            model_dir=model_dir, port=port, prefill_addresses=(stack.prefill_address,),
            decode_addresses=(stack.decode_address,), tls_cert=cert, tls_key=key, tls_ca=certs.ca)))

    late = threading.Thread(target=start_late)
    late.start()
    try:
        with Client(f"127.0.0.1:{port}", timeout_s=60, retries=8, backoff_s=0.25) as retrying:
            assert retrying.complete(PROMPT, max_new_tokens=2).usage.completion_tokens == 2
    finally:
        late.join()
        for gateway in started:
            gateway.stop()


def test_without_retries_or_past_the_deadline_unavailable_reaches_the_caller():
    closed = f"127.0.0.1:{free_port('127.0.0.1')}"
    with Client(closed, retries=0) as once, pytest.raises(grpc.RpcError) as raised:
        once.complete(PROMPT, max_new_tokens=2)
    assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
    began = time.monotonic()
    with Client(closed, retries=50, backoff_s=0.2, timeout_s=1.0) as bounded, pytest.raises(grpc.RpcError):
        bounded.complete(PROMPT, max_new_tokens=2)
    assert time.monotonic() - began < 3.0  # the deadline bounds the retries


def test_pdserve_generate_streams_through_the_client(stack):
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "pdserve.cli", "generate", "--address", stack.gateway_address,
                           "--max-new-tokens", "4", PROMPT], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() and "[length; " in done.stderr and "4 completion tokens" in done.stderr
