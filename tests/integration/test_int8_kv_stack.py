"""A stack whose tiers both keep an int8 KV cache (`pdserve up --kv-dtype int8`): greedy output equals Hugging Face
transformers' wherever an int8 cache keeps the same choices (and over --kv-transport nixl, which writes the codes
and scales as stored, int8 and fp8 stacks answer token for token as over gRPC), the KV pushed from prefill to decode
is about a quarter of float32's (codes plus one float32 scale per token and KV head), malformed scales are refused,
and an int8 prefill tier refuses an fp8 decode instance with the usual layout-mismatch error."""

import contextlib
import time
from contextlib import contextmanager

import grpc
import pytest
import torch
from bounds import greedy_margins
from helpers import collect, hf_greedy, request, require_nixl
from stack import internal_channel, launch_stack, stop_stack

from common.basics.config import DecodeConfig, GatewayConfig, PrefillConfig
from common.kv import wire as kv_wire
from common.kv.pool import KvPool
from decode_svc.server import start_decode
from gateway.server import start_gateway
from pdserve.v1 import (
    common_pb2,
    decode_pb2,
    decode_pb2_grpc,
    gateway_pb2_grpc,
    prefill_pb2,
    prefill_pb2_grpc,
)
from prefill_svc.server import start_prefill

MAX_NEW_TOKENS = 16
# Greedy paths with no near-tie in 16 tokens (transformers' top-2 margins >= 1.35 logits): an int8 cache must
# keep every token. The open-ended ones have near-ties (0.15 and 0.04), where any perturbation may flip them.
DECISIVE_PROMPTS = ["Numbers: 1, 2, 3, 4,", "Even numbers: 2, 4, 6, 8,", "10, 20, 30, 40,"]
OPEN_PROMPTS = ["The capital of France is", "Once upon a time, in a small village by the sea, there lived"]


@pytest.fixture(scope="module")
def int8_stack(model_dir):
    process, addresses = launch_stack(model_dir, "--kv-dtype", "int8")
    channels = {name: grpc.insecure_channel(address) if name == "gateway" else internal_channel(address)
                for name, address in addresses.items()}
    yield addresses, decode_pb2_grpc.DecodeStub(channels["decode"]), channels
    for channel in channels.values():
        channel.close()
    stop_stack(process)


@contextmanager
def _gateway(model_dir, *flags: str):
    process, addresses = launch_stack(model_dir, *flags)
    channel = grpc.insecure_channel(addresses["gateway"])
    try:
        yield gateway_pb2_grpc.GatewayStub(channel)
    finally:
        channel.close()
        stop_stack(process)


@pytest.fixture(scope="module", params=["int8", "fp8"])
def by_transport(request, model_dir, int8_stack):
    """{transport: gateway} of two stacks keeping `param` KV, one per --kv-transport (int8's gRPC one is
    int8_stack)."""
    require_nixl()
    with contextlib.ExitStack() as stacks:
        gateways = {"nixl": stacks.enter_context(_gateway(model_dir, "--kv-dtype", request.param, "--kv-transport",
                                                          "nixl"))}
        if request.param == "int8":
            gateways["grpc"] = gateway_pb2_grpc.GatewayStub(int8_stack[2]["gateway"])
        else:
            gateways["grpc"] = stacks.enter_context(_gateway(model_dir, "--kv-dtype", request.param))
        yield gateways


def _free_blocks(decode) -> int:
    return decode.Stats(decode_pb2.StatsRequest(), timeout=10).num_blocks_free


def _margins(logits: torch.Tensor, chosen: list[int]) -> torch.Tensor:
    """Each row's logit of its chosen token minus the best other: (rows,)."""
    picked = logits[torch.arange(len(chosen)), chosen]
    others = logits.clone()
    others[torch.arange(len(chosen)), chosen] = float("-inf")
    return picked - others.max(-1).values


def _margin_shift(model_dir, paths: list[tuple[list[int], list[int]]], dtype: torch.dtype) -> float:
    """How far a quantised KV cache moves a top-2 margin: the largest change, over every position of these
    (prompt, transformers' greedy tokens) paths fed in process, of the margin of transformers' token, between
    a float32 and a `dtype` pool. Codes that the tiers' float32 rounding puts on the other side of a rounding
    boundary move it again, by no more than requantising: so a choice whose margin exceeds twice this is kept."""
    from common.model.llama import LlamaModel
    from common.model.runner import DecodeItem, ModelRunner, PrefillChunk

    model, shift = LlamaModel.load(model_dir), 0.0
    c = model.config
    for prompt_ids, tokens in paths:
        margins = []
        for pool_dtype in (torch.float32, dtype):
            runner = ModelRunner(model, KvPool(num_layers=c.num_layers, num_blocks=4, block_size=16,
                                               num_kv_heads=c.num_kv_heads, head_dim=c.head_dim, dtype=pool_dtype))
            rows = [runner.run_prefill([PrefillChunk(prompt_ids, 0, [0, 1, 2, 3])])[0]]
            rows += [runner.run_decode([DecodeItem(t, len(prompt_ids) + i, [0, 1, 2, 3])])[0]
                     for i, t in enumerate(tokens[:-1])]
            margins.append(_margins(torch.stack(rows), tokens))
        shift = max(shift, float((margins[1] - margins[0]).abs().max()))
    return shift


def test_int8_kv_greedy_output_equals_transformers_up_to_its_near_ties(int8_stack, hf_model, model_dir):
    """Decisive prompts: all 16 tokens equal transformers' float32 greedy output. Open-ended ones: equal up to
    the first position whose margin is within twice int8's measured margin shift, where int8 may choose
    otherwise (and then the paths part for good)."""
    _, _, channels = int8_stack
    gateway = gateway_pb2_grpc.GatewayStub(channels["gateway"])
    prompts = {prompt: hf_model[1](prompt).input_ids for prompt in DECISIVE_PROMPTS + OPEN_PROMPTS}
    expected = {prompt: hf_greedy(hf_model, ids, MAX_NEW_TOKENS) for prompt, ids in prompts.items()}
    allowance = 2 * _margin_shift(model_dir, [(prompts[p], expected[p]) for p in prompts], torch.int8)
    for prompt, ids in prompts.items():
        margins = greedy_margins(hf_model, ids, expected[prompt])
        kept = next((i for i, margin in enumerate(margins) if margin <= allowance), len(margins))
        if prompt in DECISIVE_PROMPTS:
            assert kept == MAX_NEW_TOKENS, f"{prompt!r} has a margin within int8's allowance {allowance:.2f}"
        token_ids, _, _ = collect(gateway, request(prompt, max_new_tokens=MAX_NEW_TOKENS), timeout=120)
        assert token_ids[:kept] == expected[prompt][:kept], (prompt, kept, allowance, token_ids, expected[prompt])


def test_quantised_kv_over_nixl_answers_as_over_grpc(by_transport):
    """The same codes and scales land in decode's pool either way, so every greedy token is the same (int8 over
    gRPC is checked against transformers above)."""
    for prompt in (DECISIVE_PROMPTS[0], OPEN_PROMPTS[1]):
        got = {transport: collect(gateway, request(prompt, max_new_tokens=MAX_NEW_TOKENS), timeout=120)[0]
               for transport, gateway in by_transport.items()}
        assert got["nixl"] == got["grpc"] and len(got["nixl"]) == MAX_NEW_TOKENS, (prompt, got)


def test_int8_kv_transfer_is_under_30_percent_of_float32(int8_stack, hf_model):
    addresses, decode, channels = int8_stack
    free_at_start = _free_blocks(decode)
    prompt_ids = hf_model[1](OPEN_PROMPTS[1]).input_ids
    reserve = decode.Reserve(decode_pb2.ReserveRequest(num_prompt_tokens=len(prompt_ids), max_new_tokens=2),
                             timeout=10)
    reply = prefill_pb2_grpc.PrefillStub(channels["prefill"]).Prefill(prefill_pb2.PrefillRequest(
        prompt_token_ids=prompt_ids, sampling=common_pb2.SamplingParams(), decode_address=addresses["decode"],
        kv_handle=reserve.handle), timeout=60)
    assert decode.Release(decode_pb2.ReleaseRequest(handle=reserve.handle), timeout=10).released
    c = reserve.compat
    rows = len(prompt_ids) * c.num_layers * c.num_kv_heads * 2  # (token, layer, KV head) rows of K and V
    assert c.kv_dtype == "int8"
    assert reply.kv_bytes == rows * (c.head_dim + 4)  # int8 codes plus a float32 scale per row
    assert reply.kv_bytes < 0.30 * rows * c.head_dim * 4  # float32's bytes for the same prompt
    assert _free_blocks(decode) == free_at_start


def _int8_chunk(reserve, **overrides) -> decode_pb2.KvChunk:
    c = reserve.compat
    codes = torch.randint(-127, 128, (4, c.num_kv_heads, c.head_dim), dtype=torch.int8)
    payload = kv_wire.KvPayload(kv_wire.to_bytes(codes), kv_wire.to_bytes(codes),
                                kv_wire.to_bytes(torch.rand(4, c.num_kv_heads)),
                                kv_wire.to_bytes(torch.rand(4, c.num_kv_heads)))
    fields = dict(handle=reserve.handle, fingerprint=c.fingerprint, layer=0, token_start=0, token_end=4,
                  dtype="int8", shape=list(codes.shape), key=payload.key, value=payload.value,
                  key_scale=payload.key_scale, value_scale=payload.value_scale, crc32=payload.crc32)
    if "value_scale" in overrides and "crc32" not in overrides:  # a consistent sender, wrong sizes
        overrides["crc32"] = kv_wire.checksum(payload.key, payload.value, payload.key_scale, overrides["value_scale"])
    fields.update(overrides)
    return decode_pb2.KvChunk(**fields)


@pytest.mark.parametrize("overrides, code, message", [
    ({"value_scale": b"\x00" * 8}, grpc.StatusCode.INVALID_ARGUMENT, "KV value_scale has 8 bytes"),
    ({"value_scale": b""}, grpc.StatusCode.INVALID_ARGUMENT, "KV value_scale has 0 bytes"),
    ({"crc32": 0}, grpc.StatusCode.INVALID_ARGUMENT, "failed its CRC-32 check"),
    ({"dtype": "float32"}, grpc.StatusCode.FAILED_PRECONDITION, "differs from this instance's int8"),
])
def test_bad_int8_chunks_are_refused_and_released(int8_stack, overrides, code, message):
    _, decode, _ = int8_stack
    free_at_start = _free_blocks(decode)
    reserve = decode.Reserve(decode_pb2.ReserveRequest(num_prompt_tokens=4, max_new_tokens=4), timeout=10)
    with pytest.raises(grpc.RpcError) as raised:
        decode.PushKv(iter([_int8_chunk(reserve, **overrides)]), timeout=10)
    assert raised.value.code() == code
    assert message in raised.value.details()
    assert decode.Release(decode_pb2.ReleaseRequest(handle=reserve.handle), timeout=10).released
    assert _free_blocks(decode) == free_at_start


def test_corrupted_scale_bytes_fail_the_checksum(int8_stack):
    _, decode, _ = int8_stack
    reserve = decode.Reserve(decode_pb2.ReserveRequest(num_prompt_tokens=4, max_new_tokens=4), timeout=10)
    chunk = _int8_chunk(reserve)
    chunk.key_scale = chunk.key_scale[:5] + bytes([chunk.key_scale[5] ^ 0x10]) + chunk.key_scale[6:]
    with pytest.raises(grpc.RpcError) as raised:
        decode.PushKv(iter([chunk]), timeout=10)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "failed its CRC-32 check" in raised.value.details()
    assert decode.Release(decode_pb2.ReleaseRequest(handle=reserve.handle), timeout=10).released


def test_int8_prefill_refuses_an_fp8_decode_instance(model_dir):
    fp8_decode = start_decode(DecodeConfig(model_dir=model_dir, kv_dtype="fp8", kv_memory_mb=16))
    fp8_address = f"127.0.0.1:{fp8_decode.port}"
    int8_prefill = start_prefill(PrefillConfig(model_dir=model_dir, kv_dtype="int8", kv_memory_mb=16,
                                               decode_addresses=(fp8_address,)))
    gateway = start_gateway(GatewayConfig(model_dir=model_dir, port=0,
                                          prefill_addresses=(f"127.0.0.1:{int8_prefill.port}",),
                                          decode_addresses=(fp8_address,), local_prefill_tokens=0))
    try:
        with grpc.insecure_channel(f"127.0.0.1:{gateway.port}") as channel:
            with pytest.raises(grpc.RpcError) as raised:
                collect(gateway_pb2_grpc.GatewayStub(channel), request("Hello", max_new_tokens=4), timeout=60)
        assert raised.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "kv_dtype: int8 here, fp8 there" in raised.value.details()
        stats = fp8_decode.engine.stats()
        deadline = time.monotonic() + 10
        while stats.num_blocks_free != stats.num_blocks_total and time.monotonic() < deadline:
            time.sleep(0.1)
            stats = fp8_decode.engine.stats()
        assert stats.num_blocks_free == stats.num_blocks_total
    finally:
        gateway.stop()
        int8_prefill.stop()
        fp8_decode.stop()
