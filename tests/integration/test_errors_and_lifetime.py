"""Bad input gets INVALID_ARGUMENT with an actionable message; failed, cancelled and timed-out
requests give back every KV block; the service keeps serving."""

import socket
import time

import grpc
import pytest
import torch
from helpers import collect, request
from stack import paused

from common.kv import wire as kv_wire
from pdserve.v1 import common_pb2, decode_pb2, prefill_pb2

BAD_REQUESTS = {
    "no input": (request(max_new_tokens=4), "set one of prompt, messages or prompt_token_ids"),
    "empty prompt": (request("", max_new_tokens=4), "prompt is empty"),
    "max_new_tokens 0": (request("Hi", max_new_tokens=0), "max_new_tokens must be at least 1"),
    "max_new_tokens over limit": (request("Hi", max_new_tokens=5000), "exceeds this gateway's limit"),
    "prompt plus max_new_tokens over context": (
        request(token_ids=[42] * 8000, max_new_tokens=500), "exceeds the model's context of 8192"),
    "negative temperature": (
        request("Hi", sampling=common_pb2.SamplingParams(temperature=-0.5)), "temperature must be"),
    "top_p zero": (request("Hi", sampling=common_pb2.SamplingParams(top_p=0.0)), "top_p must be in (0, 1]"),
    "top_p above one": (request("Hi", sampling=common_pb2.SamplingParams(top_p=1.5)), "top_p must be in (0, 1]"),
    "negative top_k": (request("Hi", sampling=common_pb2.SamplingParams(top_k=-1)), "top_k must be >= 0"),
    "unknown role": (request(messages=[("wizard", "Hi")]), "has role 'wizard'"),
    "empty messages": (request(messages=[]), "set one of prompt"),
    "token id outside vocabulary": (request(token_ids=[1, 2, 49152]), "outside the vocabulary"),
    "empty stop string": (request("Hi", stop=[""]), "stop strings must not be empty"),
    "stop token id outside vocabulary": (request("Hi", stop_token_ids=[2, 49152]), "outside the vocabulary"),
    "too many stop token ids": (request("Hi", stop_token_ids=list(range(17))), "at most 16 are allowed"),
    "request id with a newline": (request("Hi", request_id="req\n42"), "request_id must be 1 to 128 printable ASCII"),
    "request id not ASCII": (request("Hi", request_id="req-é"), "request_id must be 1 to 128 printable ASCII"),
    # 700,000 bytes: at least 8,642 tokens of at most 81 bytes each, beyond the context, known before tokenizing
    "prompt too many bytes for the context": (request("x" * 700_000), "bytes: at least 8642 tokens"),
}


@pytest.mark.parametrize("name", BAD_REQUESTS)
def test_bad_input_is_invalid_argument_with_message(stack, name):
    req, message = BAD_REQUESTS[name]
    with pytest.raises(grpc.RpcError) as raised:
        collect(stack.gateway, req, timeout=30)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in raised.value.details()


def test_a_message_larger_than_any_valid_request_is_refused_at_the_edge(stack):
    """The gateway accepts messages up to a whole context of its longest tokens (8,192 x 81 bytes) plus 64 KiB;
    a 2 MB prompt is refused by gRPC before it is parsed."""
    with pytest.raises(grpc.RpcError) as raised:
        collect(stack.gateway, request("x" * 2_000_000, max_new_tokens=4), timeout=30)
    assert raised.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    token_ids, _, _ = collect(stack.gateway, request("The capital of France is", max_new_tokens=2))
    assert len(token_ids) == 2


def _wait_for_free_blocks(stack, expected: int, timeout_s: float = 20) -> int:
    deadline = time.monotonic() + timeout_s
    while (free := stack.decode_stats().num_blocks_free) != expected and time.monotonic() < deadline:
        time.sleep(0.1)
    return free


def test_cancelled_failed_and_timed_out_requests_free_every_block(stack):
    """Each way a request can end early, made to happen where the test says (tiers are paused to hold them
    mid-phase, not raced against the clock): every KV block comes back, exactly the sequences that were
    decoding count as cancelled, and the service keeps serving."""
    free_at_start = stack.decode_stats().num_blocks_free
    cancelled_before = stack.decode_stats().num_cancelled
    prompt = "Count from one to a thousand: one, two, three,"

    # Cancelled by the client mid-stream: the decode tier cancels the sequence (1).
    stream = stack.gateway.Generate(request(prompt, max_new_tokens=200, speculative=False), timeout=60)
    next(stream), next(stream)
    stream.cancel()
    # Deadline passes mid-decode: a token from a decode step has arrived (the first comes from prefill), then
    # the decode tier is held until the deadline is gone; resumed, it sees the cancelled call and frees the
    # sequence (2).
    deadline_s = 10.0
    started = time.monotonic()
    stream = stack.gateway.Generate(request(prompt, max_new_tokens=300, speculative=False), timeout=deadline_s)
    next(stream), next(stream)
    with paused(stack.tier_pid("decode")):
        with pytest.raises(grpc.RpcError) as raised:
            for _ in stream:
                pass
        assert raised.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert time.monotonic() - started >= deadline_s * 0.99
    # Deadline passes during prefill: the prefill tier is held, so the decode tier never starts the sequence;
    # its reservation is released (not a cancelled sequence).
    with paused(stack.tier_pid("prefill")):
        with pytest.raises(grpc.RpcError) as raised:
            collect(stack.gateway, request("word " * 1500, max_new_tokens=50), timeout=1.0)
        assert raised.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    # Invalid requests never reserve anything.
    for req, _ in BAD_REQUESTS.values():
        with pytest.raises(grpc.RpcError):
            collect(stack.gateway, req, timeout=30)
    # Ended early by a stop string: the decode tier watches for it and finishes the sequence itself.
    _, text, last = collect(stack.gateway, request("Count: one, two, three, four,", max_new_tokens=40, stop=[","]))
    assert last.finish_reason == common_pb2.FINISH_REASON_STOP and "," not in text

    assert _wait_for_free_blocks(stack, free_at_start) == free_at_start
    assert stack.decode_stats().num_cancelled == cancelled_before + 2
    # And the service keeps serving.
    token_ids, _, last = collect(stack.gateway, request("The capital of France is", max_new_tokens=4))
    assert len(token_ids) == 4 and last.finish_reason == common_pb2.FINISH_REASON_LENGTH


def test_stop_string_ends_text_before_it(stack):
    full_ids, full_text, _ = collect(stack.gateway, request("The capital of France is", max_new_tokens=20))
    stop = full_text.strip().split()[2]
    cancelled_before = stack.decode_stats().num_cancelled
    token_ids, text, last = collect(stack.gateway, request("The capital of France is", max_new_tokens=20, stop=[stop]))
    assert last.finish_reason == common_pb2.FINISH_REASON_STOP
    assert text == full_text[:full_text.index(stop)]
    assert token_ids == full_ids[:len(token_ids)] and len(token_ids) < len(full_ids)
    # The decode tier saw the stop string itself: it finished the sequence rather than being cancelled.
    assert stack.decode_stats().num_cancelled == cancelled_before


def test_seeded_sampling_is_reproducible(stack):
    sampling = common_pb2.SamplingParams(temperature=0.9, top_p=0.95, top_k=50, seed=1234)
    first, _, _ = collect(stack.gateway, request("My favourite animal is", max_new_tokens=16, sampling=sampling))
    again, _, _ = collect(stack.gateway, request("My favourite animal is", max_new_tokens=16, sampling=sampling))
    others = {tuple(collect(stack.gateway, request("My favourite animal is", max_new_tokens=16,
                                                     sampling=common_pb2.SamplingParams(temperature=0.9, seed=s)))[0])
              for s in (1, 2, 3)}
    assert first == again
    assert len(others | {tuple(first)}) > 1


def test_request_id_is_echoed(stack):
    replies = list(stack.gateway.Generate(request("Hello", max_new_tokens=3, request_id="req-42"), timeout=60))
    assert {r.request_id for r in replies} == {"req-42"}


def test_unclaimed_reservation_is_freed_when_its_lease_ends(stack):
    free_at_start = stack.decode_stats().num_blocks_free
    expired_before = stack.decode_stats().num_leases_expired
    # A lease long enough to see the blocks held on a loaded machine; nothing claims them, so they come back.
    reply = stack.decode.Reserve(decode_pb2.ReserveRequest(num_prompt_tokens=100, max_new_tokens=28, lease_ms=3000),
                                 timeout=10)
    assert reply.num_blocks == 7  # the prompt's 100 tokens: lazy growth adds blocks as tokens come
    assert stack.decode_stats().num_blocks_free == free_at_start - 7
    assert _wait_for_free_blocks(stack, free_at_start, timeout_s=30) == free_at_start
    assert stack.decode_stats().num_leases_expired == expired_before + 1
    assert not stack.decode.Release(decode_pb2.ReleaseRequest(handle=reply.handle), timeout=10).released
    with pytest.raises(grpc.RpcError) as raised:
        next(stack.decode.Decode(decode_pb2.DecodeRequest(handle=reply.handle, first_token_id=1, max_new_tokens=2),
                                 timeout=10))
    # What happened, said as such: the lease ran out (not "no such reservation").
    assert raised.value.code() == grpc.StatusCode.ABORTED
    assert "expired: no KV arrived for 3 s" in raised.value.details()


def test_reserve_caps_its_lease_and_refuses_what_the_context_cannot_hold(stack):
    """A caller cannot hold blocks for weeks (lease_ms 2^32 - 1 is cut to the instance's maximum), nor reserve
    for more tokens than the model's context (8,192)."""
    free_at_start = stack.decode_stats().num_blocks_free
    reply = stack.decode.Reserve(decode_pb2.ReserveRequest(num_prompt_tokens=1, max_new_tokens=15,
                                                           lease_ms=2**32 - 1), timeout=10)
    lease_s = reply.lease_expires_unix_ms / 1000 - time.time()
    assert 0 < lease_s <= 300  # DecodeConfig.max_lease_ms
    assert stack.decode.Release(decode_pb2.ReleaseRequest(handle=reply.handle), timeout=10).released
    with pytest.raises(grpc.RpcError) as raised:
        stack.decode.Reserve(decode_pb2.ReserveRequest(num_prompt_tokens=1, max_new_tokens=23295), timeout=10)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "exceed the model's context of 8192 tokens" in raised.value.details()
    assert stack.decode_stats().num_blocks_free == free_at_start


def test_kv_with_nan_values_is_refused_even_with_a_valid_checksum(stack):
    free_at_start = stack.decode_stats().num_blocks_free
    reply = stack.decode.Reserve(decode_pb2.ReserveRequest(num_prompt_tokens=4, max_new_tokens=4), timeout=10)
    compat = reply.compat
    key = torch.randn(4, compat.num_kv_heads, compat.head_dim)
    key[2, 1, 7] = float("nan")
    key_bytes = kv_wire.to_bytes(key)
    chunk = _chunk(reply, key=key_bytes, value=key_bytes, crc32=kv_wire.checksum(key_bytes, key_bytes))
    with pytest.raises(grpc.RpcError) as raised:
        stack.decode.PushKv(iter([chunk]), timeout=10)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "NaN or infinite" in raised.value.details()
    assert stack.decode.Release(decode_pb2.ReleaseRequest(handle=reply.handle), timeout=10).released
    assert stack.decode_stats().num_blocks_free == free_at_start


def _chunk(reserve_reply, **overrides) -> decode_pb2.KvChunk:
    compat = reserve_reply.compat
    key = torch.randn(4, compat.num_kv_heads, compat.head_dim)
    key_bytes, value_bytes = kv_wire.to_bytes(key), kv_wire.to_bytes(key)
    fields = dict(handle=reserve_reply.handle, fingerprint=compat.fingerprint, layer=0, token_start=0, token_end=4,
                  dtype=compat.kv_dtype, shape=list(key.shape), key=key_bytes, value=value_bytes,
                  crc32=kv_wire.checksum(key_bytes, value_bytes))
    fields.update(overrides)
    return decode_pb2.KvChunk(**fields)


@pytest.mark.parametrize("overrides, code, message", [
    ({"crc32": 12345}, grpc.StatusCode.INVALID_ARGUMENT, "failed its CRC-32 check"),
    ({"fingerprint": "not-the-same"}, grpc.StatusCode.FAILED_PRECONDITION, "KV layout mismatch"),
    ({"shape": [4, 3, 32]}, grpc.StatusCode.INVALID_ARGUMENT, "does not match tokens"),
    ({"token_start": 2, "token_end": 6}, grpc.StatusCode.INVALID_ARGUMENT, "expected 0"),
])
def test_bad_kv_chunks_are_refused_and_released(stack, overrides, code, message):
    free_at_start = stack.decode_stats().num_blocks_free
    reply = stack.decode.Reserve(decode_pb2.ReserveRequest(num_prompt_tokens=4, max_new_tokens=4), timeout=10)
    with pytest.raises(grpc.RpcError) as raised:
        stack.decode.PushKv(iter([_chunk(reply, **overrides)]), timeout=10)
    assert raised.value.code() == code
    assert message in raised.value.details()
    assert stack.decode.Release(decode_pb2.ReleaseRequest(handle=reply.handle), timeout=10).released
    assert stack.decode_stats().num_blocks_free == free_at_start


def test_prefill_pushes_kv_only_to_the_decode_instances_it_was_given(stack):
    """A caller naming its own address as the decode instance gets PERMISSION_DENIED, and nothing connects to
    that address: no KV, no port scan."""
    with socket.create_server(("127.0.0.1", 0)) as rogue:
        rogue.settimeout(0.5)
        address = f"127.0.0.1:{rogue.getsockname()[1]}"
        with pytest.raises(grpc.RpcError) as raised:
            stack.prefill.Prefill(prefill_pb2.PrefillRequest(prompt_token_ids=[1, 2, 3], decode_address=address,
                                                             kv_handle="kv-0-anything"), timeout=30)
        assert raised.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert f"{address!r} is not one this prefill tier pushes KV to" in raised.value.details()
        with pytest.raises(TimeoutError):
            rogue.accept()
    assert stack.prefill_stats().num_blocks_free == stack.prefill_stats().num_blocks_total
