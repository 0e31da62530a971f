"""The gateway's Generation over engines in this process (tests/support/in_process_tiers.py): the legs run in
order and the output is transformers' greedy output; a full decode instance is passed over for the next; when
none can take the request the client hears why; a cancel mid-decode frees every block on every engine."""

import pytest
from helpers import assert_greedy_matches, hf_greedy
from in_process_tiers import InProcessTiers, decode_engine, prefill_engine
from opentelemetry.trace import INVALID_SPAN

from common.basics.errors import Upstream
from common.basics.sampling import SamplingConfig
from common.model.llama import LlamaModel
from gateway.generation import Generation
from gateway.router import Router
from gateway.tiers import GenerationSpec

MAX_NEW = 12


@pytest.fixture(scope="module")
def model(model_dir):
    return LlamaModel.load(model_dir)


@pytest.fixture
def tiers(model, model_dir):
    """One prefill engine; decode "small" (one block of 16 tokens: too few for any request here) listed first."""
    tiers = InProcessTiers({"p": prefill_engine(model)},
                           {"small": decode_engine(model, model_dir, num_blocks=1), "large": decode_engine(model, model_dir)})
    engines = [*tiers.prefill_engines.values(), *tiers.decode_engines.values()]
    for engine in engines:
        engine.start()
    yield tiers
    for engine in engines:
        engine.stop()


def _generation(tiers: InProcessTiers, prompt_ids: list[int], eos: frozenset[int], decode=("small", "large")):
    spec = GenerationSpec("req-1", prompt_ids, MAX_NEW, SamplingConfig(), ())
    return Generation(spec, Router(("p",), decode), tiers, eos_token_ids=eos, lease_ms=30_000, deadline=None,
                      trace_parent=INVALID_SPAN)


def _all_free(tiers: InProcessTiers) -> bool:
    engines = [*tiers.prefill_engines.values(), *tiers.decode_engines.values()]
    return all(e.blocks.num_free == e.blocks.num_blocks for e in engines)


def test_generation_passes_over_a_full_decode_instance_and_equals_transformers(tiers, model, hf_model):
    prompt = hf_model[1]("The capital of France is").input_ids
    eos = frozenset(model.config.eos_token_ids)
    chunks = list(_generation(tiers, prompt, eos).run())
    tokens = [t for chunk in chunks for t in chunk.token_ids]
    assert_greedy_matches(hf_model, prompt, tokens, hf_greedy(hf_model, prompt, MAX_NEW))
    assert chunks[-1].finish_reason in ("stop", "length") and all(c.finish_reason is None for c in chunks[:-1])
    assert tiers.decode_engines["small"].stats().num_steps == 0 and tiers.decode_engines["large"].stats().num_steps
    assert _all_free(tiers)


def test_when_no_decode_instance_can_take_it_the_client_hears_why(tiers, model):
    with pytest.raises(Upstream) as raised:
        list(_generation(tiers, list(range(100, 140)), frozenset(model.config.eos_token_ids), ("small",)).run())
    assert raised.value.status == "RESOURCE_EXHAUSTED"
    assert "no decode instance can take this request now" in str(raised.value) and "decode KV pool is full" in str(
        raised.value)
    assert _all_free(tiers)


def test_cancel_mid_decode_frees_every_block_on_every_engine(tiers, model):
    generation = _generation(tiers, list(range(200, 260)), frozenset())  # no EOS: it would run MAX_NEW tokens
    stream = generation.run()
    next(stream), next(stream)  # the first token (prefill), then one from decode
    generation.cancel()
    rest = list(stream)
    assert rest[-1].finish_reason == "cancelled"
    assert tiers.decode_engines["large"].stats().num_cancelled == 1
    assert _all_free(tiers)
