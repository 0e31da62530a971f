"""The NIXL side of the KV transport (common/kv/nixl_transport.py): WRITEs land exactly in the named blocks of the
remote pool and nowhere else, and a remote layout that does not match, or names memory the remote agent never
registered, is refused before anything moves. Two agents in this process (UCX over loopback)."""

import itertools
import time

import pytest
import torch
from helpers import require_nixl

from common.basics.errors import FailedPrecondition, InvalidArgument
from common.kv.nixl_transport import NixlKvAgent, PoolLayout, pool_tensors
from common.kv.pool import KvPool


@pytest.fixture(autouse=True)
def _nixl():
    require_nixl()

NUM_LAYERS, NUM_BLOCKS, BLOCK_SIZE = 3, 8, 4
_AGENT_IDS = itertools.count()


def make_pool(dtype: torch.dtype, seed: int | None = None, num_blocks: int = NUM_BLOCKS) -> KvPool:
    pool = KvPool(num_layers=NUM_LAYERS, num_blocks=num_blocks, block_size=BLOCK_SIZE, num_kv_heads=2, head_dim=4,
                  dtype=dtype)
    if seed is not None:
        generator = torch.Generator().manual_seed(seed)
        for tensor in pool_tensors(pool):
            tensor.view(torch.uint8).copy_(torch.randint(1, 256, tensor.view(torch.uint8).shape, generator=generator))
    return pool


def wait_done(agent: NixlKvAgent, handle, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while (state := agent.state(handle)) == "PROC":
        assert time.monotonic() < deadline, f"a WRITE was still in flight after {timeout_s} s"
        time.sleep(1e-4)
    agent.release(handle)
    assert state == "DONE"


@pytest.fixture
def agents(request):
    """(prefill pool, prefill agent, decode pool, decode agent, the decode agent as prefill knows it); the decode
    pool is larger than prefill's, as it is in a deployment."""
    dtype = getattr(request, "param", torch.float32)
    prefill_pool, decode_pool = make_pool(dtype, seed=1), make_pool(dtype, seed=2, num_blocks=2 * NUM_BLOCKS)
    tag = next(_AGENT_IDS)  # agent names stay unique in this process
    prefill = NixlKvAgent(f"prefill-{tag}", pool_tensors(prefill_pool), BLOCK_SIZE)
    decode = NixlKvAgent(f"decode-{tag}", pool_tensors(decode_pool), BLOCK_SIZE)
    yield prefill_pool, prefill, decode_pool, decode, prefill.remote(decode.name, decode.metadata(), decode.pool_layout)
    prefill.close()
    decode.close()


def expected_after(decode_pool: KvPool, prefill_pool: KvPool, pairs: dict[int, int], layers) -> list[torch.Tensor]:
    """The decode pool's tensors as they should be once local block -> remote block `pairs` landed in `layers`."""
    expected = [t.clone() for t in pool_tensors(decode_pool)]
    for mine, source in zip(expected, pool_tensors(prefill_pool)):
        for local, remote in pairs.items():
            rows, rows_from = slice(remote * BLOCK_SIZE, (remote + 1) * BLOCK_SIZE), slice(
                local * BLOCK_SIZE, (local + 1) * BLOCK_SIZE)
            mine[layers, rows] = source[layers, rows_from]
    return expected


@pytest.mark.parametrize("agents", [torch.float32, torch.int8], indirect=True, ids=["float32", "int8-with-scales"])
def test_a_write_lands_exactly_in_the_named_blocks(agents):
    prefill_pool, prefill, decode_pool, decode, remote = agents
    pairs = {0: 13, 5: 2, 1: 3}  # not in order, and one past the prefill pool's size
    expected = expected_after(decode_pool, prefill_pool, pairs, slice(None))
    before = [t.clone() for t in pool_tensors(decode_pool)]
    for layer in range(NUM_LAYERS):
        wait_done(prefill, prefill.write(remote, layer, list(pairs), list(pairs.values())))
    for got, want, old in zip(pool_tensors(decode_pool), expected, before):
        assert not torch.equal(got.view(torch.uint8), old.view(torch.uint8))
        assert torch.equal(got.view(torch.uint8), want.view(torch.uint8))  # and every other byte unchanged


def test_a_write_touches_only_its_layer(agents):
    prefill_pool, prefill, decode_pool, decode, remote = agents
    expected = expected_after(decode_pool, prefill_pool, {2: 7, 3: 8}, [1])  # contiguous on both sides: merged
    wait_done(prefill, prefill.write(remote, 1, [2, 3], [7, 8]))
    for got, want in zip(pool_tensors(decode_pool), expected):
        assert torch.equal(got.view(torch.uint8), want.view(torch.uint8))


def test_blocks_or_layers_outside_either_pool_are_refused(agents):
    _, prefill, _, _, remote = agents
    with pytest.raises(InvalidArgument, match="outside"):
        prefill.write(remote, 0, [0], [2 * NUM_BLOCKS])
    with pytest.raises(InvalidArgument, match="outside"):
        prefill.write(remote, 0, [NUM_BLOCKS], [0])
    with pytest.raises(InvalidArgument, match="outside"):
        prefill.write(remote, NUM_LAYERS, [0], [0])
    with pytest.raises(InvalidArgument, match="local blocks for"):
        prefill.write(remote, 0, [0, 1], [0])


def test_a_mismatched_layout_is_refused_before_anything_moves(agents):
    _, prefill, _, _, _ = agents
    other = make_pool(torch.float16)
    with_other_layout = NixlKvAgent(f"other-{next(_AGENT_IDS)}", pool_tensors(other), BLOCK_SIZE)
    try:
        with pytest.raises(FailedPrecondition, match="same model, --kv-dtype and --block-size"):
            prefill.remote(with_other_layout.name, with_other_layout.metadata(), with_other_layout.pool_layout)
    finally:
        with_other_layout.close()


def test_a_layout_naming_memory_the_remote_never_registered_is_refused(agents):
    _, prefill, _, decode, _ = agents
    real = decode.pool_layout
    forged = PoolLayout(tuple(a + 64 * 2**20 for a in real.addresses), real.layer_bytes, real.num_layers,
                        real.num_blocks)
    with pytest.raises(InvalidArgument, match="not registered"):
        prefill.remote(decode.name, decode.metadata(), forged)
    with pytest.raises(InvalidArgument, match="names agent"):
        prefill.remote("someone-else", decode.metadata(), real)
