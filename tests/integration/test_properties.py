"""Hostile input, property-tested (hypothesis): every RPC of every tier, public and internal, over the running
stack's real channels (mutual TLS to the internal tiers). Messages are drawn two ways: any message of the type
(every field any value of its wire type: huge, negative-as-unsigned, NaN, control characters, random bytes) and
a valid message with one field replaced so. Whatever arrives, the answer is a result or a status a caller can act
on (never INTERNAL or UNKNOWN) with a message, the service keeps serving, and once quiet every KV block of every
tier is free again.

The default run draws a bounded number of examples per RPC (EXAMPLES); the slow run (`make slow`) many more."""

import time

import grpc
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from stack import internal_channel

from common.kv import wire as kv_wire
from pdserve.v1 import (
    common_pb2,
    decode_pb2,
    decode_pb2_grpc,
    gateway_pb2,
    prefill_pb2,
    prefill_pb2_grpc,
)

EXAMPLES = 60
SLOW_EXAMPLES = 2000
# What a caller may hear for bad input; INTERNAL and UNKNOWN mean the service failed, not the caller.
ACTIONABLE = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.FAILED_PRECONDITION,
              grpc.StatusCode.OUT_OF_RANGE, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.PERMISSION_DENIED,
              grpc.StatusCode.ABORTED, grpc.StatusCode.ALREADY_EXISTS}
_CALL_TIMEOUT_S = 60
_FIELD = {  # protobuf wire types -> the values any sender could put there
    "uint32": st.integers(0, 2**32 - 1), "uint64": st.integers(0, 2**64 - 1), "int32": st.integers(-2**31, 2**31 - 1),
    "int64": st.integers(-2**63, 2**63 - 1), "bool": st.booleans(), "string": st.text(max_size=64),
    "bytes": st.binary(max_size=4096), "double": st.floats(), "float": st.floats(width=32),
}
_TYPE_NAMES = {1: "double", 2: "float", 3: "int64", 4: "uint64", 5: "int32", 8: "bool", 9: "string", 12: "bytes",
               13: "uint32", 14: "enum"}


def _value(field, depth: int):
    if field.type == field.TYPE_MESSAGE:
        return any_message(field.message_type._concrete_class, depth + 1)
    if field.type == field.TYPE_ENUM:
        return st.sampled_from([v.number for v in field.enum_type.values])
    return _FIELD[_TYPE_NAMES[field.type]]


def any_message(cls, depth: int = 0):
    """Any message of this type: each field unset or any value of its wire type, lists up to 8 long."""
    if depth > 2:
        return st.just(cls())
    fields = {}
    for field in cls.DESCRIPTOR.fields:
        value = _value(field, depth)
        is_repeated = field.is_repeated
        fields[field.name] = st.none() | (st.lists(value, max_size=8) if is_repeated else value)

    def build(values):
        message = cls()
        for name, value in values.items():
            if value is None:
                continue
            field = cls.DESCRIPTOR.fields_by_name[name]
            if field.type == field.TYPE_MESSAGE:
                target = getattr(message, name)
                if field.is_repeated:
                    for item in value:
                        target.add().CopyFrom(item)
                else:
                    target.CopyFrom(value)
            elif field.is_repeated:
                getattr(message, name).extend(value)
            else:
                setattr(message, name, value)
        return message

    return st.fixed_dictionaries(fields).map(build)


def near_valid(valid, cls=None):
    """The valid message with one of its fields replaced by any value of that field's type."""
    cls = cls or type(valid)
    names = [f.name for f in cls.DESCRIPTOR.fields]

    @st.composite
    def one_changed(draw):
        name = draw(st.sampled_from(names))
        other = draw(any_message(cls))
        message = cls()
        message.CopyFrom(valid)
        message.ClearField(name)
        field = cls.DESCRIPTOR.fields_by_name[name]
        if field.is_repeated or field.type == field.TYPE_MESSAGE:
            message.MergeFrom(_only(other, name))
        else:
            setattr(message, name, getattr(other, name))
        return message

    return one_changed()


def _only(message, name):
    copy = type(message)()
    copy.MergeFrom(message)
    for field in type(message).DESCRIPTOR.fields:
        if field.name != name:
            copy.ClearField(field.name)
    return copy


def _settings(examples: int):
    return settings(max_examples=examples, deadline=None, derandomize=False, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                           HealthCheck.data_too_large])


def _answered(call) -> object:
    """The call's result; or, when it failed, a check that the status is one a caller can act on."""
    try:
        return call()
    except grpc.RpcError as error:
        assert error.code() in ACTIONABLE, (error.code(), error.details())
        assert error.details(), "a refusal says why"
        return None


@pytest.fixture(scope="module")
def tiers(stack):
    channels = [internal_channel(stack.prefill_address), internal_channel(stack.decode_address)]
    yield prefill_pb2_grpc.PrefillStub(channels[0]), decode_pb2_grpc.DecodeStub(channels[1])
    for channel in channels:
        channel.close()


@pytest.fixture(autouse=True)
def nothing_held_afterwards(stack):
    """After each property's examples, once quiet, every KV block of both tiers is free again."""
    yield
    deadline = time.monotonic() + 15
    while True:
        decode, prefill = stack.decode_stats(), stack.prefill_stats()
        if decode.num_blocks_free == decode.num_blocks_total and prefill.num_blocks_free == prefill.num_blocks_total:
            return
        assert time.monotonic() < deadline, ("KV blocks still held after the hostile calls", decode, prefill)
        time.sleep(0.2)


def _valid_generate() -> gateway_pb2.GenerateRequest:
    return gateway_pb2.GenerateRequest(prompt="The capital of France is", max_new_tokens=2, speculative=False)


GENERATE = any_message(gateway_pb2.GenerateRequest) | near_valid(_valid_generate())


def _generate(stack, request, request_id: str | None) -> None:
    metadata = None if request_id is None else [("x-request-id", request_id)]

    def run():
        count, last = 0, None
        for reply in stack.gateway.Generate(request, timeout=_CALL_TIMEOUT_S, metadata=metadata):
            count += len(reply.token_ids)
            last = reply
        return count, last

    # Bounded work: at most 4 tokens (0 stays 0, an invalid request; unset would mean the default, 256).
    request.max_new_tokens = min(request.max_new_tokens, 4) if request.HasField("max_new_tokens") else 4
    result = _answered(run)
    if result is not None:
        count, last = result
        assert last.finish_reason != common_pb2.FINISH_REASON_UNSPECIFIED and 1 <= count <= 4


def _metadata_value():
    # gRPC metadata is printable ASCII on the wire; the client library refuses anything else before sending.
    return st.none() | st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=200)


@given(request=GENERATE, request_id=_metadata_value())
@_settings(EXAMPLES)
def test_generate_answers_any_request_with_a_result_or_an_actionable_status(stack, request, request_id):
    _generate(stack, request, request_id)


def _valid_prefill(stack) -> prefill_pb2.PrefillRequest:
    return prefill_pb2.PrefillRequest(request_id="p", prompt_token_ids=[1, 2, 3], decode_address=stack.decode_address,
                                      kv_handle="kv-0-none", sampling=common_pb2.SamplingParams())


@given(data=st.data())
@_settings(EXAMPLES)
def test_prefill_answers_any_request_with_a_result_or_an_actionable_status(stack, tiers, data):
    _prefill(stack, tiers, data)


def _prefill(stack, tiers, data) -> None:
    prefill, _ = tiers
    request = data.draw(any_message(prefill_pb2.PrefillRequest) | near_valid(_valid_prefill(stack)))
    if len(request.prompt_token_ids) > 64:
        del request.prompt_token_ids[64:]
    _answered(lambda: prefill.Prefill(request, timeout=_CALL_TIMEOUT_S))
    _answered(lambda: prefill.Stats(prefill_pb2.PrefillStatsRequest(), timeout=_CALL_TIMEOUT_S))


@given(request=any_message(decode_pb2.ReserveRequest)
       | near_valid(decode_pb2.ReserveRequest(num_prompt_tokens=8, max_new_tokens=8, lease_ms=1000)))
@_settings(EXAMPLES)
def test_reserve_and_release_answer_any_request(stack, tiers, request):
    _, decode = tiers
    reply = _answered(lambda: decode.Reserve(request, timeout=_CALL_TIMEOUT_S))
    if reply is not None:
        lease_left_s = reply.lease_expires_unix_ms / 1000 - time.time()
        assert lease_left_s <= 300  # the lease is capped (DecodeConfig.max_lease_ms)
        released = decode.Release(decode_pb2.ReleaseRequest(handle=reply.handle), timeout=_CALL_TIMEOUT_S).released
        assert released or reply.lease_expires_unix_ms / 1000 <= time.time()  # or its short lease freed it


def _kv_chunk(reply, rows: int) -> decode_pb2.KvChunk:
    compat = reply.compat
    key = torch.randn(rows, compat.num_kv_heads, compat.head_dim)
    data = kv_wire.to_bytes(key)
    return decode_pb2.KvChunk(handle=reply.handle, fingerprint=compat.fingerprint, layer=0, token_start=0,
                              token_end=rows, dtype=compat.kv_dtype, shape=list(key.shape), key=data, value=data,
                              crc32=kv_wire.checksum(data, data))


@given(data=st.data())
@_settings(EXAMPLES)
def test_push_kv_answers_any_stream_of_chunks(stack, tiers, data):
    """Streams of 1-4 chunks into a real reservation: valid ones, valid ones with a field replaced, any chunk."""
    _push_kv(tiers, data)


def _push_kv(tiers, data) -> None:
    _, decode = tiers
    reply = decode.Reserve(decode_pb2.ReserveRequest(num_prompt_tokens=4, max_new_tokens=4), timeout=10)
    try:  # hypothesis may abandon an example inside a draw: the reservation is given back however it ends
        valid = _kv_chunk(reply, 4)
        chunks = data.draw(st.lists(st.just(valid) | near_valid(valid) | any_message(decode_pb2.KvChunk),
                                    min_size=1, max_size=4))
        _answered(lambda: decode.PushKv(iter(chunks), timeout=_CALL_TIMEOUT_S))
    finally:
        decode.Release(decode_pb2.ReleaseRequest(handle=reply.handle), timeout=10)


@given(request=any_message(decode_pb2.DecodeRequest), release=any_message(decode_pb2.ReleaseRequest))
@_settings(EXAMPLES)
def test_decode_release_and_info_answer_any_request(stack, tiers, request, release):
    prefill, decode = tiers
    request.max_new_tokens = min(request.max_new_tokens, 4)
    _answered(lambda: list(decode.Decode(request, timeout=_CALL_TIMEOUT_S)))
    assert not decode.Release(release, timeout=_CALL_TIMEOUT_S).released  # no handle of anyone's
    assert decode.GetInfo(decode_pb2.GetInfoRequest(), timeout=_CALL_TIMEOUT_S).fingerprint
    assert decode.Stats(decode_pb2.StatsRequest(), timeout=_CALL_TIMEOUT_S).num_blocks_total > 0
    assert prefill.GetInfo(prefill_pb2.GetInfoPrefillRequest(), timeout=_CALL_TIMEOUT_S).fingerprint


@pytest.mark.slow
@given(request=GENERATE, request_id=_metadata_value())
@_settings(SLOW_EXAMPLES)
def test_generate_long_run(stack, request, request_id):
    _generate(stack, request, request_id)


@pytest.mark.slow
@given(data=st.data())
@_settings(SLOW_EXAMPLES)
def test_push_kv_long_run(stack, tiers, data):
    _push_kv(tiers, data)


@pytest.mark.slow
@given(data=st.data())
@_settings(SLOW_EXAMPLES)
def test_prefill_long_run(stack, tiers, data):
    _prefill(stack, tiers, data)
