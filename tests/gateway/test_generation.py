"""The gateway's Generation over engines in this process (tests/support/in_process_tiers.py): the legs run in
order and the output is transformers' greedy output; a full decode instance is passed over for the next; when
none can take the request the client hears why; a cancel mid-decode frees every block on every engine."""

import pytest
from helpers import assert_greedy_matches, hf_greedy
from in_process_tiers import InProcessTiers, decode_engine, prefill_engine
from opentelemetry.trace import INVALID_SPAN

from common.basics.errors import Unavailable, Upstream
from common.basics.sampling import SamplingConfig
from common.model.llama import LlamaModel
from gateway.generation import Generation
from gateway.membership import Membership
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
    with tiers.running():
        yield tiers


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
    assert "no decode instance can take this request now" in str(raised.value)
    assert "need 4 KV blocks; this decode instance's pool holds 1" in str(raised.value)
    assert _all_free(tiers)


def test_when_no_prefill_instance_serves_the_reservation_is_released_at_once(model, model_dir):
    """The decode instance reserved, then no prefill instance was in rotation (one killed and restarting): the
    client hears so, and the reservation does not wait out its lease."""
    tiers = InProcessTiers({"p": prefill_engine(model)}, {"d": decode_engine(model, model_dir)})
    membership = Membership(("p",), ("d",), check=lambda address: address != "p")
    membership.refresh(("p", "d"))
    spec = GenerationSpec("req-np", list(range(100, 140)), MAX_NEW, SamplingConfig(), ())
    generation = Generation(spec, Router(("p",), ("d",), membership), tiers, eos_token_ids=frozenset(),
                            lease_ms=30_000, deadline=None, trace_parent=INVALID_SPAN)
    with tiers.running(), pytest.raises(Unavailable, match="no prefill instance is serving now"):
        list(generation.run())
    assert tiers.decode_engines["d"].stats().num_reserved == 0
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


@pytest.mark.parametrize("sampling", [SamplingConfig(), SamplingConfig(temperature=0.8, top_p=0.95, seed=7)],
                         ids=["greedy", "sampled"])
def test_a_decode_instance_that_stops_mid_stream_is_left_for_another_and_the_stream_goes_on(model, model_dir,
                                                                                            sampling):
    """Instance "a" stops after the first decode chunk; Membership (checked by hand here) takes it out of
    rotation; the Generation prefills prompt + sent tokens for "b" and goes on from the next position: the whole
    stream equals the undisturbed one (sampled draws are seeded by position), with one migration."""
    tiers = InProcessTiers({"p": prefill_engine(model)},
                           {"a": decode_engine(model, model_dir), "b": decode_engine(model, model_dir)})
    down: set[str] = set()
    membership = Membership(("p",), ("a", "b"), check=lambda address: address not in down)
    membership.refresh(("p", "a", "b"))
    spec = GenerationSpec("req-m", list(range(300, 340)), MAX_NEW, sampling, ())

    def generation() -> Generation:
        return Generation(spec, Router(("p",), ("a", "b"), membership), tiers, eos_token_ids=frozenset(),
                          lease_ms=30_000, deadline=None, trace_parent=INVALID_SPAN)
    with tiers.running():
        undisturbed = [t for chunk in generation().run() for t in chunk.token_ids]
        moved = generation()
        stream = moved.run()
        tokens = next(stream).token_ids + next(stream).token_ids  # prefill's token, then "a"'s first step
        down.add("a")
        tiers.decode_engines["a"].stop()
        tokens += [t for chunk in stream for t in chunk.token_ids]
        assert tokens == undisturbed and len(tokens) == MAX_NEW
        assert moved.num_migrations == 1
        assert _all_free(tiers)


def test_a_prompt_whose_prefill_outlasts_the_lease_is_served(model, model_dir):
    """The reservation's lease (0.1 s here) is renewed by every KV chunk that lands (each layer of each forward),
    so a prompt whose prefill takes several leases (400 tokens in chunks of 8: 50 forwards of 30 layers) is
    served, not expired half-way."""
    lease_ms = 100
    tiers = InProcessTiers({"p": prefill_engine(model, num_blocks=40, chunk_size=8)},
                           {"d": decode_engine(model, model_dir, num_blocks=40, lease_s=lease_ms / 1000)})
    spec = GenerationSpec("long", [1000 + i % 500 for i in range(400)], 4, SamplingConfig(), ())
    generation = Generation(spec, Router(("p",), ("d",)), tiers, eos_token_ids=frozenset(), lease_ms=lease_ms,
                            deadline=None, trace_parent=INVALID_SPAN)
    with tiers.running():
        tokens = [t for chunk in generation.run() for t in chunk.token_ids]
        assert len(tokens) == 4
        assert generation.timings.prefill_ms > 2 * lease_ms  # it did outlast the lease, twice over
        assert tiers.decode_engines["d"].stats().num_leases_expired == 0
        assert _all_free(tiers)
