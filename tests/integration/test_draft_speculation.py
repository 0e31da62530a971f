"""Draft-model speculation through the running service (`pdserve up --speculative draft --draft-model`):
token-identical to plain decoding for every prompt, alone and concurrently beside non-speculating
requests, in the disaggregated and the colocated topology; a draft with another tokenizer stops the decode
tier at start-up with a message that says so. The draft is the target's first two layers (no training):
weak, so most steps reject and the rejection paths run as much as the accepting ones."""

import concurrent.futures
import json
import shutil
import subprocess
import sys

import pytest
from draft_models import truncated_draft
from helpers import collect, request
from speculation_prompts import MAX_NEW_TOKENS, PROMPTS
from stack import internal_channel, launch_stack, stop_stack

from pdserve.launcher import free_port
from pdserve.v1 import decode_pb2, decode_pb2_grpc, gateway_pb2_grpc


@pytest.fixture(scope="module")
def draft_dir(model_dir, tmp_path_factory):
    return truncated_draft(model_dir, tmp_path_factory.mktemp("draft") / "two-layers")


@pytest.fixture(scope="module")
def draft_stack(model_dir, draft_dir):
    """Always proposing 4 tokens (--speculative-fixed-k): adaptive k would soon stop proposing for a draft
    this weak, and this module tests that the proposals it verifies never change the output."""
    import grpc

    process, addresses = launch_stack(model_dir, "--speculative", "draft", "--draft-model", str(draft_dir),
                                      "--speculative-fixed-k")
    channels = {name: grpc.insecure_channel(address) if name == "gateway" else internal_channel(address)
                for name, address in addresses.items()}
    yield gateway_pb2_grpc.GatewayStub(channels["gateway"]), decode_pb2_grpc.DecodeStub(channels["decode"])
    for channel in channels.values():
        channel.close()
    stop_stack(process)


def _run(gateway, prompt: str, speculative: bool):
    return collect(gateway, request(prompt, max_new_tokens=MAX_NEW_TOKENS, speculative=speculative))


def test_greedy_output_with_a_draft_model_is_identical_to_plain_decoding(draft_stack):
    gateway, decode = draft_stack
    proposed = 0
    for prompt in PROMPTS:
        plain, _, plain_last = _run(gateway, prompt, False)
        spec, _, spec_last = _run(gateway, prompt, True)
        assert spec == plain, prompt
        assert not plain_last.HasField("speculation")
        proposed += spec_last.speculation.num_proposed
    assert proposed >= 4 * (len(PROMPTS) - 1)  # fixed k: every step that speculated proposed 4 tokens
    stats = decode.Stats(decode_pb2.StatsRequest(), timeout=10)
    assert stats.num_spec_proposed == proposed
    assert stats.num_blocks_free == stats.num_blocks_total


def test_concurrent_draft_and_plain_requests_equal_their_solo_outputs(draft_stack):
    gateway, _ = draft_stack
    solo = [_run(gateway, p, False)[0] for p in PROMPTS]
    with concurrent.futures.ThreadPoolExecutor(max_workers=2 * len(PROMPTS)) as pool:
        futures = [pool.submit(_run, gateway, p, s) for p in PROMPTS for s in (True, False)]
        results = [f.result()[0] for f in futures]
    assert results == [s for s in solo for _ in (True, False)]


@pytest.mark.slow  # a stack of its own (25 s); the draft's losslessness and colocated serving are each in make test
def test_colocated_mode_speculates_with_the_draft_too(model_dir, draft_dir):
    import grpc

    process, addresses = launch_stack(model_dir, "--colocated", "--speculative", "draft", "--draft-model",
                                      str(draft_dir), "--speculative-fixed-k")
    try:
        with grpc.insecure_channel(addresses["gateway"]) as channel:
            gateway = gateway_pb2_grpc.GatewayStub(channel)
            plain, _, _ = _run(gateway, PROMPTS[2], False)
            spec, _, last = _run(gateway, PROMPTS[2], True)
        assert spec == plain and last.speculation.num_proposed > 0
    finally:
        stop_stack(process)


def test_a_draft_with_another_tokenizer_stops_the_decode_tier_at_start_up(model_dir, draft_dir, tmp_path):
    bad = tmp_path / "bad-draft"
    shutil.copytree(draft_dir, bad)
    tokenizer = json.loads((bad / "tokenizer.json").read_text())
    vocab = tokenizer["model"]["vocab"]
    vocab["the"], vocab["and"] = vocab["and"], vocab["the"]
    (bad / "tokenizer.json").write_text(json.dumps(tokenizer))
    done = subprocess.run([sys.executable, "-m", "pdserve.cli", "decode", "--model", str(model_dir),
                           "--port", str(free_port("127.0.0.1")), "--metrics-port", "0", "--kv-memory-mb", "64",
                           "--speculative", "draft", "--draft-model", str(bad)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert f"draft model {bad} does not share the tokenizer of {model_dir.name}" in done.stderr
    assert "vocabulary: 2 tokens differ" in done.stderr
