"""KV reuse and lazy KV memory, over the real engines in this process (tests/support/in_process_tiers.py): what a
request gets with the prefix cache on equals what it gets with it off, and transformers' greedy output, alone and
side by side, for a repeated prompt, a shared prefix ending mid-block, and prompts that diverge after it; under pool
pressure (eviction) and with a forced hash collision; when the decode pool is too small for every sequence's final
length (preemption); and when the decode instance prefills a short prompt itself. Every block is back at the end."""

import random
import threading

import pytest
from helpers import assert_greedy_matches, hf_greedy
from in_process_tiers import (
    PREFIX_ROOT,
    InProcessTiers,
    decode_engine,
    prefill_engine,
    runner_over,
)
from opentelemetry.trace import INVALID_SPAN

from common.basics.sampling import SamplingConfig
from common.basics.tokenizer import TextTokenizer
from common.kv.block_manager import BlockManager
from common.model.llama import LlamaModel
from decode_svc.engine import DecodeEngine
from decode_svc.scheduler import Scheduler
from gateway.generation import PATH_DECODE_LOCAL, PATH_PREFILL_TIER, Generation
from gateway.router import Router
from gateway.tiers import GenerationSpec

MAX_NEW = 12
BLOCK = 16


@pytest.fixture(scope="module")
def model(model_dir):
    return LlamaModel.load(model_dir)


def _ids(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(1000, 40000) for _ in range(n)]


@pytest.fixture(scope="module")
def prompts():
    """A 40-token shared prefix (ends mid-block: 2.5 blocks) and three continuations that diverge after it, one
    of them twice; and one unrelated prompt."""
    rng = random.Random(16)
    shared = _ids(rng, 40)
    a, b, c = shared + _ids(rng, 9), shared + _ids(rng, 23), shared + _ids(rng, 30)
    return [a, b, a, c, _ids(rng, 37), b]


def _run(tiers: InProcessTiers, prompt: list[int], eos, *, local_prefill_tokens: int = 0,
         max_new: int = MAX_NEW, decode=("d",)) -> tuple[list[int], Generation]:
    spec = GenerationSpec("req", prompt, max_new, SamplingConfig(), ())
    generation = Generation(spec, Router(("p",), decode), tiers, eos_token_ids=eos, lease_ms=30_000, deadline=None,
                            trace_parent=INVALID_SPAN, local_prefill_tokens=local_prefill_tokens)
    return [t for chunk in generation.run() for t in chunk.token_ids], generation


def _tiers(model, model_dir, *, caching: bool, prefill_blocks: int = 64, decode_blocks: int = 64,
           kv_growth: str = "lazy") -> InProcessTiers:
    return InProcessTiers({"p": prefill_engine(model, num_blocks=prefill_blocks, prefix_caching=caching)},
                          {"d": decode_engine(model, model_dir, num_blocks=decode_blocks, prefix_caching=caching,
                                              kv_growth=kv_growth)})


def _all_free(tiers: InProcessTiers) -> bool:
    engines = [*tiers.prefill_engines.values(), *tiers.decode_engines.values()]
    return all(e.blocks.num_free == e.blocks.num_blocks for e in engines)


@pytest.fixture(scope="module")
def reference(model, model_dir, prompts, hf_model):
    """Each prompt's output with the prefix cache off, checked against transformers' greedy output."""
    eos = frozenset(model.config.eos_token_ids)
    with _tiers(model, model_dir, caching=False).running() as tiers:
        outputs = {tuple(p): _run(tiers, p, eos)[0] for p in prompts}
    for prompt, got in outputs.items():
        assert_greedy_matches(hf_model, list(prompt), got, hf_greedy(hf_model, list(prompt), MAX_NEW))
    return outputs


def test_cached_prefixes_give_the_uncached_output_alone_and_push_only_what_decode_lacks(model, model_dir, prompts,
                                                                                         reference):
    eos = frozenset(model.config.eos_token_ids)
    with _tiers(model, model_dir, caching=True).running() as tiers:
        runs = [_run(tiers, p, eos) for p in prompts]
        for prompt, (got, _) in zip(prompts, runs):
            assert got == reference[tuple(prompt)]
        cached = [g.timings.cached_tokens for _, g in runs]
        pushed = [g.timings.kv_bytes for _, g in runs]
        # b after a: the shared prefix's two full blocks; the repeated a: all its full blocks short of the last
        # token's; the unrelated prompt: nothing.
        assert cached == [0, 32, 48, 32, 0, 48]
        per_token = pushed[0] / len(prompts[0])
        assert pushed[2] == per_token * (len(prompts[2]) - 48)  # decode held 48 tokens: the rest was pushed
        assert pushed[5] == per_token * (len(prompts[5]) - 48)
        stats = tiers.decode_engines["d"].stats()
        assert stats.num_prefix_hit_tokens == 32 + 48 + 32 + 48 and stats.num_cached_blocks > 0
        assert _all_free(tiers)  # cached blocks are evictable: counted free


def test_cached_prefixes_give_the_uncached_output_side_by_side(model, model_dir, prompts, reference):
    eos = frozenset(model.config.eos_token_ids)
    with _tiers(model, model_dir, caching=True).running() as tiers:
        _run(tiers, prompts[0], eos)  # the shared prefix is cached: the rest share it while running together
        outputs: dict[int, list[int]] = {}
        threads = [threading.Thread(target=lambda i=i, p=p: outputs.__setitem__(i, _run(tiers, p, eos)[0]))
                   for i, p in enumerate(prompts)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(300)
        assert [outputs[i] for i in range(len(prompts))] == [reference[tuple(p)] for p in prompts]
        assert tiers.decode_engines["d"].stats().max_batch_size > 1
        assert _all_free(tiers)


def test_eviction_under_pool_pressure_serves_correct_output(model, model_dir, prompts, reference):
    """Pools of 6 (prefill) and 8 (decode) blocks: every prompt needs 4-5, so each evicts what the one before
    cached, least recently used first."""
    eos = frozenset(model.config.eos_token_ids)
    with _tiers(model, model_dir, caching=True, prefill_blocks=6, decode_blocks=8).running() as tiers:
        for prompt in prompts + prompts[::-1]:
            assert _run(tiers, prompt, eos)[0] == reference[tuple(prompt)]
        assert tiers.prefill_engines["p"].blocks.cache_version and _all_free(tiers)


def test_a_forced_hash_collision_is_detected_and_not_served(model, model_dir, prompts, reference):
    """Every block hashes alike: a different prompt's blocks are found by name, refused on their token ids."""
    eos = frozenset(model.config.eos_token_ids)
    runner, _ = runner_over(model, 64)
    blocks = BlockManager(64, BLOCK, prefix_root=PREFIX_ROOT, hash_fn=lambda parent, tokens: 7)
    decode = DecodeEngine(runner, blocks, Scheduler(8), 30.0, TextTokenizer(model_dir))
    tiers = InProcessTiers({"p": prefill_engine(model, prefix_caching=False)}, {"d": decode})
    with tiers.running():
        first, unrelated = prompts[0], prompts[4]
        assert _run(tiers, first, eos)[0] == reference[tuple(first)]
        got, generation = _run(tiers, unrelated, eos)
        assert got == reference[tuple(unrelated)]
        assert blocks.prefix_counts.collisions >= 1 and blocks.prefix_counts.hit_tokens == 0
        assert _all_free(tiers)


def test_preemption_completes_every_request_as_it_would_alone(model, model_dir, hf_model):
    """Four requests whose final lengths (20 + 28 tokens) need 12 blocks on a 9-block decode pool: lazy growth
    admits them all (2 blocks each), preempts the most recently admitted when the pool runs out, recomputes its KV
    later; each output equals its solo run (and transformers'), and every block comes back."""
    eos = frozenset(model.config.eos_token_ids)
    rng = random.Random(7)
    prompts = [_ids(rng, 20) for _ in range(4)]
    max_new = 28
    solo = {}
    with _tiers(model, model_dir, caching=False).running() as tiers:
        for prompt in prompts:
            solo[tuple(prompt)] = _run(tiers, prompt, eos, max_new=max_new)[0]
    for prompt in prompts[:2]:
        assert_greedy_matches(hf_model, prompt, solo[tuple(prompt)], hf_greedy(hf_model, prompt, max_new))
    with _tiers(model, model_dir, caching=True, decode_blocks=9).running() as tiers:
        outputs: dict[int, list[int]] = {}
        threads = [threading.Thread(target=lambda i=i, p=p: outputs.__setitem__(i, _run(tiers, p, eos,
                                                                                       max_new=max_new)[0]))
                   for i, p in enumerate(prompts)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(300)
        assert [outputs[i] for i in range(4)] == [solo[tuple(p)] for p in prompts]
        stats = tiers.decode_engines["d"].stats()
        assert stats.num_preemptions >= 1 and stats.max_batch_size >= 3
        assert _all_free(tiers)


def test_upfront_reservation_holds_the_whole_budget(model, model_dir):
    """--kv-growth upfront: a reservation takes prompt + max_new_tokens blocks at once; lazy takes the prompt's."""
    lazy = decode_engine(model, model_dir, num_blocks=32)
    upfront = decode_engine(model, model_dir, num_blocks=32, kv_growth="upfront")
    assert lazy.reserve(20, 100).num_blocks == 2
    assert upfront.reserve(20, 100).num_blocks == 8


def test_a_short_uncached_prompt_is_prefilled_by_the_decode_instance(model, model_dir, prompts, reference):
    eos = frozenset(model.config.eos_token_ids)
    with _tiers(model, model_dir, caching=True).running() as tiers:
        got, generation = _run(tiers, prompts[0], eos, local_prefill_tokens=64)
        assert got == reference[tuple(prompts[0])]
        assert generation.timings.prefill_path == PATH_DECODE_LOCAL and generation.timings.kv_bytes == 0
        # the same prompt again: decode holds all but its last partial block; 1 token over the threshold of 0
        got, generation = _run(tiers, prompts[2], eos, local_prefill_tokens=len(prompts[2]) - 48)
        assert got == reference[tuple(prompts[2])]
        assert generation.timings.prefill_path == PATH_DECODE_LOCAL and generation.timings.cached_tokens == 48
        got, generation = _run(tiers, prompts[1], eos, local_prefill_tokens=4)  # 23 uncached: over the threshold
        assert got == reference[tuple(prompts[1])] and generation.timings.prefill_path == PATH_PREFILL_TIER
        assert tiers.prefill_engines["p"].stats().num_prompts == 1
        assert tiers.decode_engines["d"].stats().num_local_prefills == 2
        assert _all_free(tiers)
