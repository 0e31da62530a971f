"""BlockManager: exact block ids (lowest first, in one run when one is free), capacity, and reservation leases."""

import random

import pytest

from common.kv.block_manager import MAX_RUN_WINDOWS, BlockManager, OutOfBlocks


def test_allocation_hands_out_lowest_free_ids_in_order():
    blocks = BlockManager(num_blocks=8, block_size=4)
    assert blocks.allocate(5) == [0, 1]
    assert blocks.allocate(4) == [2]
    assert blocks.num_free == 5


@pytest.mark.parametrize(("num_tokens", "expected"), [(0, 0), (1, 1), (4, 1), (5, 2), (8, 2), (9, 3)])
def test_blocks_needed_rounds_up_to_whole_blocks(num_tokens, expected):
    assert BlockManager(num_blocks=8, block_size=4).blocks_needed(num_tokens) == expected


def test_freed_blocks_are_reused_lowest_first():
    blocks = BlockManager(num_blocks=4, block_size=2)
    first = blocks.allocate(4)
    blocks.free(first)
    assert blocks.allocate(8) == [0, 1, 2, 3]


def test_allocation_takes_a_run_of_consecutive_blocks_when_one_is_free():
    blocks = BlockManager(num_blocks=10, block_size=1)
    a, b, c, d = blocks.allocate(2), blocks.allocate(1), blocks.allocate(3), blocks.allocate(4)  # 0-1, 2, 3-5, 6-9
    blocks.free(a)
    blocks.free(c)
    assert blocks.allocate(3) == [3, 4, 5]  # 0-1 is too short: the first run of three
    blocks.free(b)
    assert blocks.allocate(3) == [0, 1, 2]  # freed 0-1 and 2 join into one run
    blocks.free(d)
    blocks.free([1])
    assert blocks.allocate(5) == [1, 6, 7, 8, 9]  # no run of five: the lowest ids, scattered


def test_run_search_finds_the_run_a_scan_of_every_window_finds():
    rng = random.Random(0)
    for _ in range(2000):
        blocks = BlockManager(num_blocks=60, block_size=1)
        blocks.allocate(60)
        free, length = sorted(rng.sample(range(60), rng.randint(0, 60))), rng.randint(1, 8)
        blocks.free(free)
        if length > len(free):
            continue
        windows = range(len(free) - length + 1)
        first = next((i for i in windows if free[i + length - 1] - free[i] == length - 1), None)
        expected = free[first:first + length] if first is not None else free[:length]
        assert blocks.allocate(length) == expected


def test_run_search_is_bounded_in_a_fragmented_pool():
    """Every other block taken: the only run lies past the search bound, so the lowest free ids come."""
    size = 4 * MAX_RUN_WINDOWS + 8
    blocks = BlockManager(num_blocks=size, block_size=1)
    blocks.free(blocks.allocate(size)[::2] + [size - 3])  # the only run: size - 4, size - 3, size - 2
    assert blocks.allocate(2) == [0, 2]


def test_allocation_beyond_capacity_raises_and_takes_nothing():
    blocks = BlockManager(num_blocks=3, block_size=4)
    blocks.allocate(8)
    with pytest.raises(OutOfBlocks, match="2 KV blocks, 1 are free"):
        blocks.allocate(5)
    assert blocks.num_free == 1
    assert blocks.allocate(4) == [2]


def test_full_pool_rejects_even_one_token():
    blocks = BlockManager(num_blocks=2, block_size=4)
    blocks.allocate(8)
    with pytest.raises(OutOfBlocks):
        blocks.allocate(1)


@pytest.mark.parametrize(("num_blocks", "block_size"), [(0, 4), (4, 0), (-1, 4)])
def test_empty_pool_or_zero_block_size_is_rejected(num_blocks, block_size):
    with pytest.raises(ValueError):
        BlockManager(num_blocks, block_size)


def test_reserve_holds_blocks_until_the_lease_end():
    blocks = BlockManager(num_blocks=8, block_size=4)
    reservation = blocks.reserve("a", 10, lease_s=5.0, now=100.0)
    assert reservation.block_ids == [0, 1, 2]
    assert reservation.expires_at == 105.0
    assert blocks.get("a") is reservation
    assert blocks.num_free == 5
    assert blocks.num_reserved == 1


def test_reserving_an_existing_handle_raises_and_keeps_the_first_reservation():
    blocks = BlockManager(num_blocks=8, block_size=4)
    blocks.reserve("a", 4, lease_s=5.0, now=0.0)
    with pytest.raises(ValueError, match="exists already"):
        blocks.reserve("a", 4, lease_s=5.0, now=0.0)
    assert blocks.get("a").block_ids == [0]
    assert blocks.num_free == 7


def test_reserve_beyond_capacity_leaves_no_reservation():
    blocks = BlockManager(num_blocks=2, block_size=4)
    with pytest.raises(OutOfBlocks):
        blocks.reserve("a", 9, lease_s=5.0, now=0.0)
    assert blocks.get("a") is None
    assert blocks.num_free == 2


def test_expire_frees_only_reservations_whose_lease_ended():
    blocks = BlockManager(num_blocks=8, block_size=4)
    blocks.reserve("short", 8, lease_s=1.0, now=0.0)  # blocks 0, 1
    blocks.reserve("long", 4, lease_s=10.0, now=0.0)  # block 2
    assert blocks.expire(now=0.5) == []
    assert [r.handle for r in blocks.expire(now=1.0)] == ["short"]
    assert blocks.get("short") is None
    assert blocks.get("long").block_ids == [2]
    assert blocks.num_free == 7
    assert blocks.allocate(20) == [3, 4, 5, 6, 7]
    assert blocks.allocate(8) == [0, 1]


def test_claim_ends_the_lease_without_freeing_the_blocks():
    blocks = BlockManager(num_blocks=4, block_size=4)
    blocks.reserve("a", 8, lease_s=1.0, now=0.0)
    assert blocks.claim("a") == [0, 1]
    assert blocks.get("a") is None
    assert blocks.num_free == 2
    assert blocks.expire(now=100.0) == []
    assert blocks.num_free == 2


def test_release_frees_once_and_a_second_release_returns_false():
    blocks = BlockManager(num_blocks=4, block_size=4)
    blocks.reserve("a", 8, lease_s=1.0, now=0.0)
    assert blocks.release("a") is True
    assert blocks.num_free == 4
    assert blocks.release("a") is False
    assert blocks.num_free == 4
    assert blocks.allocate(16) == [0, 1, 2, 3]  # each block once


def test_release_of_an_unknown_handle_returns_false():
    assert BlockManager(num_blocks=4, block_size=4).release("nope") is False


def test_released_handle_can_be_reserved_again():
    blocks = BlockManager(num_blocks=4, block_size=4)
    blocks.reserve("a", 4, lease_s=1.0, now=0.0)
    blocks.release("a")
    assert blocks.reserve("a", 4, lease_s=1.0, now=0.0).block_ids == [0]


def test_progress_renews_a_lease_for_a_full_term_and_never_shortens_it():
    blocks = BlockManager(num_blocks=4, block_size=4)
    blocks.reserve("a", 8, lease_s=10.0, now=0.0)
    blocks.renew("a", now=8.0)  # KV arrived at t=8: the lease runs to 18
    assert blocks.expire(now=17.9) == []
    blocks.renew("a", now=1.0)  # a late-recorded progress never pulls the end back
    assert blocks.get("a").expires_at == 18.0
    assert [r.handle for r in blocks.expire(now=18.0)] == ["a"] and blocks.num_free == 4


# The prefix cache.

ROOT = 12345


def _cache(num_blocks: int = 8, **kwargs) -> BlockManager:
    return BlockManager(num_blocks, 4, prefix_root=ROOT, **kwargs)


def test_a_registered_prefix_is_found_by_its_tokens_shared_and_kept_after_its_request():
    blocks = _cache()
    prompt = list(range(100, 110))  # two full blocks and two tokens
    table = blocks.allocate(len(prompt))
    blocks.register(table, prompt)
    assert blocks.num_cached == 2
    blocks.free(table)
    assert blocks.num_free == 8  # cached but unreferenced: evictable, so free to allocate
    hit = blocks.match(prompt + [7, 7])  # the same prefix, another ending
    assert hit == table[:2] and blocks.num_free == 6
    assert blocks.match(prompt[:5] + [0, 0, 0]) == table[:1]  # diverges in the second block
    assert blocks.match([1] + prompt[1:]) == []  # diverges in the first: nothing after it counts
    assert blocks.match(prompt, max_tokens=7) == table[:1]  # at most 7 tokens: one whole block
    blocks.free(hit + table[:1] + table[:1])
    assert blocks.num_free == 8 and blocks.prefix_counts.hit_tokens == 8 + 4 + 4


def test_cached_blocks_are_evicted_least_recently_used_and_only_when_no_free_block_is_left():
    blocks = _cache(num_blocks=4)
    a, b = list(range(4)), list(range(10, 14))
    table_a, table_b = blocks.allocate(4), blocks.allocate(4)
    blocks.register(table_a, a)
    blocks.register(table_b, b)
    blocks.free(table_a)
    blocks.free(table_b)
    blocks.free(blocks.match(a))  # a used again: b is now the least recently used
    assert blocks.allocate(8) == [2, 3]  # the two never-cached blocks first
    taken = blocks.allocate(4)
    assert taken == table_b and blocks.match(b) == [] and blocks.match(a) == table_a
    with pytest.raises(OutOfBlocks):
        blocks.allocate(4)  # a is referenced now: not evictable


def test_a_hash_collision_is_counted_and_not_served():
    blocks = _cache(hash_fn=lambda parent, tokens: 99)  # every block has the same name
    table = blocks.allocate(4)
    blocks.register(table, [1, 2, 3, 4])
    assert blocks.match([5, 6, 7, 8]) == [] and blocks.prefix_counts.collisions == 1
    assert blocks.match([1, 2, 3, 4]) == table


def test_the_summary_names_every_cached_block_and_says_unchanged_until_the_set_changes():
    blocks = _cache()
    first = blocks.summary(0, num_requests=0, num_queued_tokens=0)
    assert first.hashes == [] and first.prefix_caching
    assert blocks.summary(first.version, num_requests=0, num_queued_tokens=0).hashes is None
    table = blocks.allocate(8)
    blocks.register(table, list(range(8)))
    second = blocks.summary(first.version, num_requests=1, num_queued_tokens=2)
    assert second.version != first.version and sorted(second.hashes) == sorted(blocks.prefix_hashes(list(range(8))))


def test_without_a_prefix_root_nothing_is_cached():
    blocks = BlockManager(8, 4)
    table = blocks.allocate(8)
    blocks.register(table, list(range(8)))
    blocks.free(table)
    assert blocks.num_cached == 0 and blocks.match(list(range(8))) == [] and blocks.num_free == 8
