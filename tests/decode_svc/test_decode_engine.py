"""The decode engine alone (real weights, no servers), its KV brought by the in-process transport from a
prefill engine: greedy decoding equals transformers, sequences arriving together share steps, every ending
(finish, cancel, lease) gives the blocks back, and malformed transfers are refused."""

import time

import pytest
import torch
from helpers import assert_greedy_matches, hf_greedy
from in_process_tiers import decode_engine, prefill_engine

from common.basics.errors import Aborted, InvalidArgument, NotFound
from common.basics.sampling import SamplingConfig
from common.kv.quant import KvRows
from common.kv.transport import InProcessKvSender
from common.model.llama import LlamaModel
from prefill_svc.engine import PrefillJob

MAX_NEW = 12


@pytest.fixture(scope="module")
def model(model_dir):
    return LlamaModel.load(model_dir)


@pytest.fixture
def engines(model, model_dir):
    """A running prefill engine, and a decode engine each test starts when it wants steps to begin."""
    prefill, decode = prefill_engine(model), decode_engine(model, model_dir)
    prefill.start()
    yield prefill, decode
    prefill.stop()
    decode.stop()


def _start(prefill, decode, prompt_ids: list[int], max_new: int = MAX_NEW):
    """Reserve on decode, prefill into the reservation over the in-process transport, start decoding."""
    handle = decode.reserve(len(prompt_ids), max_new, prompt_ids=prompt_ids).handle
    job = prefill.submit(PrefillJob("r", prompt_ids, SamplingConfig(), InProcessKvSender(decode, handle)))
    assert job.done.wait(120)
    job.sender.wait()
    eos = frozenset(decode.runner.model.config.eos_token_ids)
    return decode.start_decode(handle, job.first_token, max_new, SamplingConfig(), eos, (), prompt_ids)


def _tokens(seq) -> list[int]:
    tokens = list(seq.tokens[:1])
    while True:
        event = seq.outbox.get(timeout=120)
        tokens += event.token_ids
        if event.finish_reason:
            return tokens


def test_greedy_decoding_equals_transformers_and_frees_every_block(engines, hf_model):
    prefill, decode = engines
    prompts = [hf_model[1](t).input_ids for t in ("The capital of France is", "Numbers: 1, 2, 3, 4,")]
    seqs = [_start(prefill, decode, ids) for ids in prompts]
    decode.start()  # both are waiting: the first step admits them together
    for ids, seq in zip(prompts, seqs):
        assert_greedy_matches(hf_model, ids, _tokens(seq), hf_greedy(hf_model, ids, MAX_NEW))
    assert decode.stats().max_batch_size == 2  # both were admitted before either finished
    assert decode.blocks.num_free == decode.blocks.num_blocks
    assert prefill.blocks.num_free == prefill.blocks.num_blocks


def test_cancel_mid_decode_and_an_expired_lease_give_the_blocks_back(engines, model, model_dir):
    prefill, decode = engines
    decode.start()
    seq = _start(prefill, decode, list(range(300, 340)), max_new=200)
    seq.outbox.get(timeout=120)  # decoding
    decode.cancel(seq)
    while not seq.finished:
        time.sleep(0.01)
    assert decode.stats().num_cancelled == 1
    short_lease = decode_engine(model, model_dir, lease_s=0.05)
    reserved = short_lease.reserve(40, 10)
    handle, num_blocks = reserved.handle, reserved.num_blocks
    assert short_lease.blocks.num_free == short_lease.blocks.num_blocks - num_blocks
    time.sleep(0.1)  # the lease is over: the next step (or idle check) frees it
    short_lease.step()
    assert short_lease.blocks.num_free == short_lease.blocks.num_blocks
    with pytest.raises(Aborted, match="expired: no KV arrived for 0.05 s"):  # said as such, not "no such thing"
        short_lease.transfer_complete(handle)
    with pytest.raises(NotFound, match="released or never made"):
        short_lease.transfer_complete("kv-never-made")
    assert decode.blocks.num_free == decode.blocks.num_blocks


def test_kv_out_of_order_or_past_the_prompt_is_refused(engines, model):
    _, decode = engines
    handle = decode.reserve(8, 4).handle
    c = model.config
    rows = KvRows(torch.zeros(4, c.num_kv_heads, c.head_dim), torch.zeros(4, c.num_kv_heads, c.head_dim))
    with pytest.raises(InvalidArgument, match="expected 0"):
        decode.receive_kv(handle, 0, 4, rows)
    decode.receive_kv(handle, 0, 0, rows)
    decode.receive_kv(handle, 0, 4, rows)
    with pytest.raises(InvalidArgument, match="past the 8 reserved"):
        decode.receive_kv(handle, 0, 8, rows)
    with pytest.raises(InvalidArgument, match="out of range"):
        decode.receive_kv(handle, c.num_layers, 0, rows)
    assert decode.release(handle) and decode.blocks.num_free == decode.blocks.num_blocks


def test_chunked_local_prefill_advances_between_decode_steps_and_keeps_the_answers(model, model_dir, engines,
                                                                                   hf_model):
    """With --step-prefill-tokens 16 a 50-token prompt prefilled on the decode tier takes four steps (16, 16, 16,
    2 tokens), and the sequence already decoding gets a token at every one of them: a long prompt no longer
    stalls the batch. Both answers stay transformers' greedy ones, and every block comes back."""
    prefill, _ = engines
    decode = decode_engine(model, model_dir, step_prefill_tokens=16)
    running_ids = hf_model[1]("The capital of France is").input_ids
    running = _start(prefill, decode, running_ids)
    decode.step()  # admitted, first decode step
    local_ids = hf_model[1]("Paged attention keeps the cache in blocks of tokens, so a sequence grows one block at "
                            "a time and the pool serves many sequences of different lengths at once.").input_ids
    local_ids = (local_ids * 2)[:50]
    handle = decode.reserve(len(local_ids), MAX_NEW, prompt_ids=local_ids).handle
    eos = frozenset(model.config.eos_token_ids)
    local = decode.start_decode(handle, 0, MAX_NEW, SamplingConfig(), eos, (), local_ids, prefill_locally=True)
    for step in range(4):
        before = len(running.tokens)
        assert not local.tokens, f"the prompt's first token came after {step} budgeted steps"
        decode.step()
        assert len(running.tokens) == before + 1  # the decoding sequence advanced in the same step
    assert len(local.tokens) == 1  # the fourth step finished the prompt: its first token is drawn
    while not (running.finished and local.finished):
        decode.step()
    for ids, seq in ((running_ids, running), (local_ids, local)):
        assert_greedy_matches(hf_model, ids, seq.tokens, hf_greedy(hf_model, ids, MAX_NEW))
    assert decode.blocks.num_free == decode.blocks.num_blocks
