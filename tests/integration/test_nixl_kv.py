"""--kv-transport nixl through a whole stack: the prefill tier writes KV straight into decode's reserved blocks with
one-sided NIXL WRITEs, controlled by Decode.WriteKv (common/kv/nixl_stream.py).

`pdserve up --kv-transport nixl` serves greedy output equal to transformers' (prefix-cached prompts too) and reports
what it wrote; mismatched transports are refused with a message naming the flag. A reservation that ends while its
writer may still write is fenced, never reused, until the writer says it stopped (a cancelled request, the prefill
tier held still mid-transfer), or until --nixl-fence-ms after its stream broke (a killed prefill tier). The fence's
mechanics against one decode instance: tests/integration/test_nixl_lifetimes.py."""

import os
import signal
import threading
import time

import grpc
import pytest
from helpers import assert_greedy_matches, collect, hf_greedy, request, require_nixl, wait_for
from stack import STACK_BLOCK_SIZE, paused, running_stack, tier_identity

from common.basics.compat import Compat
from common.basics.errors import FailedPrecondition
from pdserve.v1 import common_pb2, decode_pb2, prefill_pb2
from prefill_svc.server import DecodePeers

FENCE_MS = 1500
LONG_PROMPT = ("A ledger of the harbour's trade, kept by the clerk of the port: barrels of salt, bolts of cloth, "
               "crates of tea and the ships that brought them. ") * 40 + "The clerk wrote:"


@pytest.fixture(scope="module")
def nixl_stack(model_dir):
    require_nixl()
    with running_stack(model_dir, "--kv-transport", "nixl", "--nixl-fence-ms", str(FENCE_MS)) as stack:
        yield stack


def _decode_free(stack) -> bool:
    decode = stack.decode_stats()
    return (decode.num_blocks_free == decode.num_blocks_total and decode.num_fenced_blocks == 0
            and decode.num_reserved == 0)


def _all_free(stack) -> bool:
    prefill = stack.prefill_stats()
    return _decode_free(stack) and prefill.num_blocks_free == prefill.num_blocks_total


def test_greedy_output_over_nixl_equals_transformers(nixl_stack, hf_model):
    """Prompts of one block, of several chunks ending mid-block, and the long one again (decode's prefix cache
    then holds its leading blocks: the write starts past them)."""
    tokenizer = hf_model[1]
    prompts = ["The capital of France is", "Once upon a time, in a small village by the sea, there lived " * 6,
               LONG_PROMPT[:700], LONG_PROMPT[:700]]
    hits_before = nixl_stack.decode_stats().num_prefix_hit_tokens
    for prompt in prompts:
        ids = tokenizer(prompt).input_ids
        assert len(ids) % STACK_BLOCK_SIZE or len(ids) < STACK_BLOCK_SIZE  # a partial last block is written too
        token_ids, _, _ = collect(nixl_stack.gateway, request(prompt, max_new_tokens=12, speculative=False))
        assert_greedy_matches(hf_model, ids, token_ids, hf_greedy(hf_model, ids, 12))
    assert nixl_stack.decode_stats().num_prefix_hit_tokens > hits_before  # the repeat skipped cached blocks
    wait_for(lambda: _all_free(nixl_stack), 10, "every block free after the requests")


def test_mismatched_transports_are_refused_naming_the_flag(nixl_stack):
    chunk = decode_pb2.KvChunk(handle="kv-0", layer=0, token_start=0, token_end=1)
    with pytest.raises(grpc.RpcError) as raised:
        nixl_stack.decode.PushKv(iter([chunk]), timeout=10)
    assert raised.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "receives KV over nixl" in raised.value.details() and "--kv-transport" in raised.value.details()
    # A gRPC-transport prefill tier checks the decode instance before sending anything.
    info = nixl_stack.decode.GetInfo(decode_pb2.GetInfoRequest(), timeout=10)
    compat = Compat(info.model_id, info.weights_digest, info.kv_dtype, info.block_size, info.num_layers,
                    info.num_kv_heads, info.head_dim)
    peers = DecodePeers(compat, (nixl_stack.decode_address,), tier_identity(), kv_transport="grpc")
    with pytest.raises(FailedPrecondition, match="receives KV over nixl, this prefill tier sends it over grpc; "
                                                 "start prefill and decode with the same --kv-transport"):
        peers.stub_for(nixl_stack.decode_address)


def test_the_prefill_tier_reports_what_it_wrote(nixl_stack, hf_model):
    """Prefill's reply (and its kv.transfer span) counts the bytes NIXL moved: whole blocks of every layer, keys and
    values, and one transfer per layer per chunk that completed blocks; its first token is transformers'."""
    ids = hf_model[1]("Report: " + LONG_PROMPT[:300]).input_ids  # not in either prefix cache
    reserved = nixl_stack.decode.Reserve(decode_pb2.ReserveRequest(num_prompt_tokens=len(ids), max_new_tokens=1),
                                         timeout=10)
    reply = nixl_stack.prefill.Prefill(prefill_pb2.PrefillRequest(
        prompt_token_ids=ids, sampling=common_pb2.SamplingParams(), decode_address=nixl_stack.decode_address,
        kv_handle=reserved.handle), timeout=60)
    assert nixl_stack.decode.Release(decode_pb2.ReleaseRequest(handle=reserved.handle), timeout=10).released
    c = reserved.compat
    blocks = -(-len(ids) // STACK_BLOCK_SIZE)
    assert reply.kv_bytes == blocks * STACK_BLOCK_SIZE * c.num_layers * 2 * c.num_kv_heads * c.head_dim * 4
    assert reply.kv_chunks == c.num_layers * reply.num_chunks  # every chunk here completes a block (32 = 2 x 16)
    assert reply.first_token_id == hf_greedy(hf_model, ids, 1)[0] and reply.kv_transfer_ms >= 0
    wait_for(lambda: _all_free(nixl_stack), 10, "every block free")


def _held_mid_transfer(stack, prompt: str):
    """A request of `prompt` whose prefill has computed at least one chunk (its WriteKv stream is open); returns
    the gateway's stream."""
    steps = stack.prefill_stats().num_steps
    stream = stack.gateway.Generate(request(prompt, max_new_tokens=8, speculative=False), timeout=120)
    outcome = {}
    threading.Thread(target=lambda: outcome.update(result=_drain_quietly(stream)), daemon=True).start()
    wait_for(lambda: stack.prefill_stats().num_steps > steps, 60, "the prompt's first chunk computed")
    return stream


def _drain_quietly(stream):
    try:
        return list(stream)
    except grpc.RpcError as error:
        return error.code()


def test_a_cancelled_request_fences_its_blocks_until_the_writer_stops(nixl_stack):
    """The prefill tier is held still mid-transfer and the client cancels: the gateway releases the reservation,
    whose blocks stay fenced (the writer could still write) until the prefill tier, resumed, stops its writes."""
    stream = _held_mid_transfer(nixl_stack, "Cancelled: " + LONG_PROMPT)
    with paused(nixl_stack.tier_pid("prefill")):
        stream.cancel()
        fenced = wait_for(lambda: nixl_stack.decode_stats().num_fenced_blocks, 10, "the released reservation fenced")
        assert fenced > 0 and nixl_stack.decode_stats().num_reserved == 0
        time.sleep(FENCE_MS / 1000 + 0.5)  # an open stream keeps its fence however long
        assert nixl_stack.decode_stats().num_fenced_blocks == fenced
    wait_for(lambda: _all_free(nixl_stack), 20, "the fence lifted once the writer stopped")


def test_a_killed_prefill_tier_leaves_no_block_held(nixl_stack, hf_model):
    """Killed mid-transfer: its stream breaks without a stop, so decode keeps the blocks fenced for --nixl-fence-ms
    (a writer cut off by the network stops within its own timeout; a dead one writes nothing), then frees them.
    The launcher restarts the tier and the stack serves exact output again."""
    prefill_pid = nixl_stack.tier_pid("prefill")
    _held_mid_transfer(nixl_stack, "Killed: " + LONG_PROMPT)
    os.kill(prefill_pid, signal.SIGKILL)
    wait_for(lambda: _decode_free(nixl_stack), 30, "every decode block free after the kill")  # fence time: in process
    wait_for(lambda: nixl_stack.tier_pid("prefill") != prefill_pid, 60, "the prefill tier restarted")
    deadline = time.monotonic() + 60
    while True:
        try:
            token_ids, _, _ = collect(nixl_stack.gateway, request("The capital of France is", max_new_tokens=8))
            break
        except grpc.RpcError:
            assert time.monotonic() < deadline, "the stack did not serve again after the prefill tier restarted"
            time.sleep(0.5)
    ids = hf_model[1]("The capital of France is").input_ids
    assert_greedy_matches(hf_model, ids, token_ids, hf_greedy(hf_model, ids, 8))
    wait_for(lambda: _all_free(nixl_stack), 10, "every block free")
