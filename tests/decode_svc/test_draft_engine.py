"""Draft-model speculation inside one decode engine (real weights, no servers, the engine stepped by hand):
greedy output equals plain decoding; a draft that is the target itself gets nearly every token accepted,
which only happens when its own KV tracks the accepted text exactly; draft KV blocks come back after
finish and cancel; sampled drafts carry their distributions; start-up calibration prices the draft."""

import pytest
import torch
from draft_models import truncated_draft

from common.basics.config import DecodeConfig
from common.basics.sampling import SamplingConfig
from common.basics.tokenizer import TextTokenizer
from common.model.runner import PrefillChunk
from common.model.sampling import sample
from common.runtime.tier import build_runtime
from decode_svc.calibration import measure_step_costs
from decode_svc.draft import draft_for
from decode_svc.engine import DecodeEngine
from decode_svc.scheduler import Scheduler
from decode_svc.speculation import SpecState, SpeculationConfig

PROMPTS = ["The capital of France is", "def add(a, b):\n    return a + b\n\ndef sub(a, b):\n",
           "List the days of the week: Monday, Tuesday,", "Write a short poem about the sea."]
MAX_NEW_TOKENS = 20


@pytest.fixture(scope="module")
def runtime(model_dir):
    return build_runtime(DecodeConfig(model_dir=model_dir, kv_memory_mb=64))


@pytest.fixture(scope="module")
def small_draft(model_dir, tmp_path_factory):
    return truncated_draft(model_dir, tmp_path_factory.mktemp("draft") / "two-layers")


def _engine(runtime, model_dir, draft_dir, adaptive: bool = False) -> DecodeEngine:
    config = DecodeConfig(model_dir=model_dir, kv_memory_mb=64, speculative="draft", draft_model=draft_dir)
    speculation = SpeculationConfig("draft", 4, 8, adaptive)
    return DecodeEngine(runtime.runner, runtime.blocks, Scheduler(8), 30.0, TextTokenizer(model_dir), speculation,
                        draft_for(config, runtime.runner, runtime.blocks))


def _submit(engine: DecodeEngine, prompt_ids: list[int], speculate: bool | None = None,
            sampling: SamplingConfig = SamplingConfig()):
    """Reserve, prefill into the reserved blocks in place of the prefill tier, start decoding."""
    handle = engine.reserve(len(prompt_ids), MAX_NEW_TOKENS).handle
    transfer = engine.transfers[handle]
    logits = engine.runner.run_prefill([PrefillChunk(prompt_ids, 0, transfer.block_ids)])  # (1, vocab)
    transfer.received = [len(prompt_ids)] * len(transfer.received)
    eos = frozenset(engine.runner.model.config.eos_token_ids)
    first = sample(logits, [sampling], [0])[0]
    return engine.start_decode(handle, first, MAX_NEW_TOKENS, sampling, eos, (), prompt_ids, speculate)


def _run(engine: DecodeEngine, seqs) -> list[list[int]]:
    while not all(s.finished for s in seqs):
        engine.step()
    return [list(s.tokens) for s in seqs]


@pytest.fixture(scope="module")
def prompt_ids(model_dir):
    tokenizer = TextTokenizer(model_dir)
    return [tokenizer.encode(p) for p in PROMPTS]


@pytest.fixture(scope="module")
def plain(runtime, model_dir, small_draft, prompt_ids):
    engine = _engine(runtime, model_dir, small_draft)
    return [_run(engine, [_submit(engine, ids, speculate=False)])[0] for ids in prompt_ids]


def test_a_draft_that_is_the_target_is_accepted_almost_always(runtime, model_dir, prompt_ids, plain):
    engine = _engine(runtime, model_dir, model_dir)  # the target drafting for itself
    seqs = [_submit(engine, ids) for ids in prompt_ids[:2]]
    assert _run(engine, seqs) == plain[:2]
    proposed = sum(s.spec.num_proposed for s in seqs)
    accepted = sum(s.spec.num_accepted for s in seqs)
    assert proposed > 0 and accepted / proposed >= 0.9  # stale or misplaced draft KV would wreck this
    assert engine.draft.num_free_blocks == engine.draft.blocks.num_blocks


def test_a_small_draft_is_lossless_batched_and_mixed_with_plain_requests(runtime, model_dir, small_draft,
                                                                         prompt_ids, plain):
    engine = _engine(runtime, model_dir, small_draft)
    seqs = [_submit(engine, ids, speculate=speculate) for ids in prompt_ids for speculate in (None, False)]
    assert _run(engine, seqs) == [p for p in plain for _ in range(2)]
    assert sum(s.spec.num_proposed for s in seqs if s.spec) > 0
    assert engine.draft.num_free_blocks == engine.draft.blocks.num_blocks


def test_draft_blocks_come_back_after_cancel(runtime, model_dir, small_draft, prompt_ids):
    engine = _engine(runtime, model_dir, small_draft)
    total = engine.draft.blocks.num_blocks
    seqs = [_submit(engine, ids) for ids in prompt_ids]
    assert engine.draft.num_free_blocks < total  # each speculating sequence holds draft KV
    for _ in range(2):
        engine.step()
    engine.cancel(seqs[0])
    engine.step()
    assert seqs[0].finished
    held = sum(len(engine.draft._slots[s.handle].block_ids) for s in seqs if not s.finished)
    assert held > 0 and engine.draft.num_free_blocks == total - held
    for seq in seqs[1:]:
        engine.cancel(seq)
    engine.step()
    assert engine.draft.num_free_blocks == total
    assert engine.blocks.num_free == engine.blocks.num_blocks


def test_sampled_drafts_carry_their_distribution_and_are_reproducible(runtime, model_dir, small_draft, prompt_ids):
    engine = _engine(runtime, model_dir, small_draft)
    sampling = SamplingConfig(temperature=0.8, top_k=50, seed=11)
    chat_ids = TextTokenizer(model_dir).apply_chat_template([{"role": "user", "content": PROMPTS[3]}])
    seq = _submit(engine, chat_ids, sampling=sampling)
    assert not seq.finished
    proposal = engine.draft.propose([seq], [3])[0]
    assert len(proposal.tokens) == 3 and proposal.probs.shape == (3, runtime.runner.model.config.vocab_size)
    assert torch.allclose(proposal.probs.sum(dim=1), torch.ones(3))
    assert all(proposal.probs[i, t] > 0 for i, t in enumerate(proposal.tokens))
    assert int((proposal.probs > 0).sum(dim=1).max()) <= 50  # the request's top-k applies to the draft too
    assert float(proposal.probs[:, 4096:].sum()) == 0.0  # tokens outside the draft's head: q = 0
    first = _run(engine, [seq])[0]
    again = _run(engine, [_submit(engine, chat_ids, sampling=sampling)])[0]
    assert first == again


def test_calibration_prices_the_draft_and_a_slow_draft_turns_speculation_off(runtime, model_dir, monkeypatch):
    """Calibration prices a step verifying k drafts with the k draft forwards that proposed them. Timed by a
    clock that counts model forwards (so the figures do not depend on this machine's speed or load): a
    verify step is one forward, and drafting with the target adds k more, so speculation never pays."""
    engine = _engine(runtime, model_dir, model_dir)  # drafting with the target costs a target step per token
    forwards = 0
    for runner in (runtime.runner, engine.draft.runner):
        counted = runner.run_decode

        def run_decode(items, counted=counted):
            nonlocal forwards
            forwards += 1
            return counted(items)

        monkeypatch.setattr(runner, "run_decode", run_decode)
    plain = measure_step_costs(runtime.runner, runtime.blocks, 4, repeats=3, clock=lambda: forwards)
    with_draft = measure_step_costs(runtime.runner, runtime.blocks, 4, engine.draft, repeats=3, clock=lambda: forwards)
    assert plain == (1.0,) * 5
    assert with_draft == (1.0, 2.0, 3.0, 4.0, 5.0)
    assert SpecState(max_k=4, step_costs=with_draft).next_k() == 0
    assert engine.draft.num_free_blocks == engine.draft.blocks.num_blocks  # scratch blocks given back
