"""KV-aware routing with the instances' cache summaries scripted (no servers): the PrefixIndex keeps what each
instance last reported (its set across `unchanged` replies, nothing for one that stops answering), and the
Router sends a prompt where weight x uncached blocks + load is lowest, the same way in every gateway that reads
the same summaries, whatever each gateway has in flight."""

import threading
import time
from contextlib import ExitStack
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from common.basics.errors import Unavailable
from common.kv.prefix import block_hashes, root_hash
from gateway.kv_index import PrefixIndex
from gateway.membership import Membership
from gateway.router import Router
from gateway.tiers import CacheSummary

FINGERPRINT, BLOCK_SIZE = "llama-f32-b4", 4
PROMPT = list(range(100, 132))  # 8 full blocks
PREFILL, DECODE = ("p1", "p2"), ("d1", "d2")


def names(token_ids: list[int], fingerprint: str = FINGERPRINT) -> frozenset[int]:
    return frozenset(block_hashes(token_ids, BLOCK_SIZE, root_hash(fingerprint)))


def report(held: frozenset[int] = frozenset(), *, load: int = 0, version: int = 1, fingerprint: str = FINGERPRINT,
           prefix_caching: bool = True) -> CacheSummary:
    """load: blocks held by running sequences (decode) or prompt tokens still to compute (prefill)."""
    return CacheSummary(fingerprint, BLOCK_SIZE, version, held, num_blocks_total=1000, num_blocks_free=900,
                        num_requests=1, num_queued_tokens=load, prefix_caching=prefix_caching)


class Instances:
    """The summary callable of a PrefixIndex: answers as a tier does (`unchanged` when the caller names the
    current version), or not at all for an address reported as None."""

    def __init__(self, reports: dict[str, CacheSummary | None]) -> None:
        self.reports = reports
        self.asked: list[tuple[str, int]] = []
        self._lock = threading.Lock()

    def __call__(self, address: str, known_version: int) -> CacheSummary | None:
        with self._lock:
            self.asked.append((address, known_version))
        summary = self.reports.get(address)
        if summary is not None and summary.version == known_version:
            return replace(summary, block_hashes=None)
        return summary


def kv_router(reports: dict[str, CacheSummary | None], prefix_weight: float = 1.0,
              membership: Membership | None = None) -> Router:
    index = PrefixIndex((*PREFILL, *DECODE), Instances(reports))
    index.refresh()
    return Router(PREFILL, DECODE, membership, index, prefix_weight)


def test_the_prompt_goes_where_its_blocks_are_when_they_outweigh_the_load_and_elsewhere_when_load_dominates():
    held = names(PROMPT)  # all 8 blocks: 8 blocks of prefill saved there
    cheap_enough = kv_router({"d1": report(held, load=5), "d2": report(load=0)})
    assert cheap_enough.decode_order(prompt_ids=PROMPT) == ["d1", "d2"]  # 0 + 5 < 8 + 0
    too_busy = kv_router({"d1": report(held, load=20), "d2": report(load=0)})
    assert too_busy.decode_order(prompt_ids=PROMPT) == ["d2", "d1"]  # 0 + 20 > 8 + 0
    heavier_prefix = kv_router({"d1": report(held, load=20), "d2": report(load=0)}, prefix_weight=3.0)
    assert heavier_prefix.decode_order(prompt_ids=PROMPT) == ["d1", "d2"]  # 0 + 20 < 24 + 0

    # prefill: the load is prompt tokens still to compute, in blocks
    assert kv_router({"p1": report(held, load=20), "p2": report()}).pick_prefill(prompt_ids=PROMPT) == "p1"  # 5 < 8
    assert kv_router({"p1": report(held, load=40), "p2": report()}).pick_prefill(prompt_ids=PROMPT) == "p2"  # 10 > 8


def test_prefix_weight_zero_routes_by_reported_load_alone():
    router = kv_router({"p1": report(names(PROMPT), load=8), "p2": report(load=4),
                        "d1": report(names(PROMPT), load=1), "d2": report(load=0)}, prefix_weight=0.0)
    assert router.decode_order(prompt_ids=PROMPT) == ["d2", "d1"]
    assert router.pick_prefill(prompt_ids=PROMPT) == "p2"


def test_only_the_leading_run_of_held_blocks_counts():
    blocks = block_hashes(PROMPT, BLOCK_SIZE, root_hash(FINGERPRINT))
    router = kv_router({
        "d1": report(frozenset(blocks[:2] + blocks[3:])),  # block 2 missing: only 0 and 1 count
        "d2": report(frozenset(blocks[1:])),  # block 0 missing: nothing counts
        "p1": report(names(PROMPT, "another-layout"), fingerprint="another-layout"),  # named under its own root
        "p2": report(names(PROMPT), prefix_caching=False),  # a tier without prefix caching reuses nothing
    })
    assert [router.expected_cached_blocks(a, PROMPT) for a in ("d1", "d2", "p1", "p2")] == [2, 0, 8, 0]
    assert router.expected_cached_blocks("d1", PROMPT[:11]) == 2  # the trailing partial block is never named
    assert Router(PREFILL, DECODE).expected_cached_blocks("d1", PROMPT) == 0  # no index


def test_unchanged_replies_keep_the_set_and_a_new_version_replaces_it():
    instances = Instances({"d1": report(names(PROMPT), version=7)})
    index = PrefixIndex(("d1",), instances)
    index.refresh()
    index.refresh()
    assert instances.asked == [("d1", 0), ("d1", 7)]  # the second ask names the version held: `unchanged`
    assert index.num_cached_blocks("d1", PROMPT) == 8

    instances.reports["d1"] = report(names(PROMPT[:8]), version=8)  # two blocks left, the rest evicted
    index.refresh()
    assert index.num_cached_blocks("d1", PROMPT) == 2 and index.summary("d1").version == 8


def test_an_instance_that_stops_answering_holds_nothing_until_it_answers_again():
    instances = Instances({"p1": report(), "p2": report(), "d1": report(names(PROMPT), version=3), "d2": report()})
    index = PrefixIndex((*PREFILL, *DECODE), instances)
    index.refresh()
    router = Router(PREFILL, DECODE, index=index)
    assert router.decode_order(prompt_ids=PROMPT) == ["d1", "d2"]

    instances.reports["d1"] = None
    index.refresh()
    assert index.summary("d1") is None and router.expected_cached_blocks("d1", PROMPT) == 0
    with router.decoding("d2"):  # no summary from d1: the order falls back to this gateway's own load
        assert router.decode_order(prompt_ids=PROMPT) == ["d1", "d2"]
    assert router.decode_order(prompt_ids=PROMPT) == ["d1", "d2"]  # ties: configured order

    instances.reports["d1"] = report(names(PROMPT), version=3)
    instances.asked.clear()
    index.refresh()
    assert ("d1", 0) in instances.asked  # it asks for a whole set again, not `unchanged` since version 3
    assert router.expected_cached_blocks("d1", PROMPT) == 8


def test_without_prompt_or_index_the_order_is_by_this_gateways_own_load():
    router = kv_router({"p1": report(names(PROMPT)), "p2": report(), "d1": report(names(PROMPT)), "d2": report()})
    with router.decoding("d1"), router.prefilling("p1", 100):
        assert router.decode_order() == ["d2", "d1"] and router.pick_prefill() == "p2"
        assert router.decode_order(prompt_ids=PROMPT) == ["d1", "d2"] and router.pick_prefill(prompt_ids=PROMPT) == "p1"
        plain = Router(PREFILL, DECODE)
        with plain.decoding("d1"):
            assert plain.decode_order(prompt_ids=PROMPT) == ["d2", "d1"]


def test_avoided_and_out_of_rotation_instances_are_never_picked_however_cheap():
    answers = {"p1": True, "p2": True, "d1": False, "d2": True}
    membership = Membership(PREFILL, DECODE, check=answers.get)
    membership.refresh((*PREFILL, *DECODE))
    router = kv_router({"p1": report(names(PROMPT)), "p2": report(load=400), "d1": report(names(PROMPT)),
                        "d2": report(load=400)}, membership=membership)
    assert router.decode_order(prompt_ids=PROMPT) == ["d2"]  # d1 holds it all, but is out of rotation
    assert router.decode_order(frozenset({"d2"}), prompt_ids=PROMPT) == []
    assert router.pick_prefill(frozenset({"p1"}), prompt_ids=PROMPT) == "p2"
    with pytest.raises(Unavailable):
        router.pick_prefill(frozenset(PREFILL), prompt_ids=PROMPT)


def test_start_polls_in_the_background_until_stopped():
    instances = Instances({"d1": report()})
    index = PrefixIndex(("d1",), instances, interval_s=0.01)
    index.start()
    try:
        assert index.num_cached_blocks("d1", PROMPT) == 0  # the first round is done before start returns
        instances.reports["d1"] = report(names(PROMPT), version=2)
        deadline = time.monotonic() + 10
        while index.num_cached_blocks("d1", PROMPT) != 8 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert index.num_cached_blocks("d1", PROMPT) == 8
    finally:
        index.stop()


# Prompts over a small vocabulary, so that they often share leading blocks with what the instances hold.
tokens = st.lists(st.integers(0, 2), min_size=0, max_size=24)
instance_report = st.builds(lambda cached, load: report(frozenset().union(*map(names, cached)), load=load),
                            st.lists(tokens, max_size=4), st.integers(0, 8))


@settings(max_examples=50, deadline=None)
@given(reports=st.fixed_dictionaries({a: instance_report for a in (*PREFILL, *DECODE)}),
       prompts=st.lists(tokens, min_size=1, max_size=10), in_flight=st.lists(st.sampled_from(DECODE), max_size=5))
def test_gateways_that_read_the_same_summaries_route_alike_whatever_each_has_in_flight(reports, prompts, in_flight):
    one, other = kv_router(reports), kv_router(reports)  # two gateways, each with its own index over the tiers
    with ExitStack() as stack:
        for address in in_flight:  # only `one` has requests in flight
            stack.enter_context(one.decoding(address))
            stack.enter_context(one.prefilling(PREFILL[0], 64))
        for prompt in prompts:
            assert one.decode_order(prompt_ids=prompt) == other.decode_order(prompt_ids=prompt)
            assert one.pick_prefill(prompt_ids=prompt) == other.pick_prefill(prompt_ids=prompt)
        if in_flight:  # by their own loads they would differ: what they share is only the summaries
            assert one.pick_prefill() != other.pick_prefill()


def test_equal_costs_spread_different_prompts_and_keep_one_prompt_in_one_place():
    """An idle fleet and fresh prompts: every instance costs the same; the prompt's hash breaks the tie, so a burst
    of different prompts does not all go to the first instance, and a prompt goes where it went before."""
    reports = {"p1": report(), "p2": report(), "d1": report(), "d2": report()}
    router, other_gateway = kv_router(reports), kv_router(reports)
    prompts = [[1000 + i, 2000 + i, 3000 + i, 4000 + i, 5000 + i] for i in range(40)]
    firsts = [router.decode_order(prompt_ids=p)[0] for p in prompts]
    assert 10 <= firsts.count("d1") <= 30
    assert 10 <= [router.pick_prefill(prompt_ids=p) for p in prompts].count("p1") <= 30
    assert firsts == [other_gateway.decode_order(prompt_ids=p)[0] for p in prompts]
    assert firsts == [router.decode_order(prompt_ids=p)[0] for p in prompts]
