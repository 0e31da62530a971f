"""The NIXL transport's lifetimes against one decode instance in this process (a real gRPC server with mutual TLS,
--kv-transport nixl, a pool of 6 blocks), written by the test's own NIXL agent as a prefill tier would write it:
a late write into a released reservation lands in fenced blocks and a reservation that needs them waits; a broken
stream fences for --nixl-fence-ms; a lease that ends mid-transfer is revoked and the prefill tier's sender stops;
a write stream is checked before anything is written, and a commit short of the prompt or of NaN KV is refused."""

import queue
import threading
import time

import grpc
import pytest
import torch
from helpers import require_nixl, wait_for
from stack import CERTS_DIR, internal_channel

from common.basics.config import DecodeConfig
from common.basics.errors import Aborted
from common.kv.nixl_stream import NixlKvSender
from common.kv.nixl_transport import NixlKvAgent, PoolLayout, pool_tensors
from common.kv.pool import KvPool
from common.kv.quant import KvRows
from decode_svc.server import start_decode
from pdserve.certs import ensure_certs
from pdserve.v1 import decode_pb2, decode_pb2_grpc

FENCE_MS = 1500

NUM_BLOCKS = 6


@pytest.fixture(scope="module")
def decode_instance(model_dir):
    require_nixl()
    certs = ensure_certs(CERTS_DIR)
    running = start_decode(DecodeConfig(model_dir=model_dir, kv_transport="nixl", kv_blocks=NUM_BLOCKS,
                                        block_size=16, prefix_caching=False, nixl_fence_ms=FENCE_MS,
                                        tls_cert=certs.for_tier("decode")[0], tls_key=certs.for_tier("decode")[1],
                                        tls_ca=certs.ca))
    channel = internal_channel(f"127.0.0.1:{running.port}")
    stub = decode_pb2_grpc.DecodeStub(channel)
    info = stub.GetInfo(decode_pb2.GetInfoRequest(), timeout=10)
    pool = KvPool(num_layers=info.num_layers, num_blocks=4, block_size=16, num_kv_heads=info.num_kv_heads,
                  head_dim=info.head_dim, dtype=torch.float32)
    writer = NixlKvAgent("test-writer", pool_tensors(pool), 16)
    yield running, stub, info, pool, writer
    writer.close()
    channel.close()
    running.stop()


class RawWriter:
    """The prefill side of one WriteKv stream, driven step by step by the test."""

    def __init__(self, stub, agent: NixlKvAgent, handle: str, fingerprint: str) -> None:
        self.agent, self.requests, self.replies = agent, queue.Queue(), queue.Queue()
        self.requests.put(decode_pb2.KvWriteRequest(open=decode_pb2.KvWriteOpen(
            handle=handle, fingerprint=fingerprint, writer_agent=agent.name)))
        self.call = stub.WriteKv(iter(self.requests.get, None), timeout=60)
        threading.Thread(target=self._read, daemon=True).start()
        self.target = self.reply().target
        layout = PoolLayout(tuple(self.target.tensor_addresses), tuple(self.target.layer_bytes),
                            agent.pool_layout.num_layers, self.target.num_blocks)
        self.remote = agent.remote(self.target.agent_name, self.target.agent_metadata, layout)

    def _read(self) -> None:
        try:
            for reply in self.call:
                self.replies.put(reply)
        except grpc.RpcError:
            pass  # the test reads the call's status

    def reply(self, timeout_s: float = 10.0) -> decode_pb2.KvWriteReply:
        return self.replies.get(timeout=timeout_s)

    def write_all(self) -> None:
        """Every layer of the local blocks into the target's blocks, waited to DONE."""
        blocks = list(self.target.block_ids)
        for layer in range(self.agent.pool_layout.num_layers):
            handle = self.agent.write(self.remote, layer, list(range(len(blocks))), blocks)
            while (state := self.agent.state(handle)) == "PROC":
                time.sleep(1e-4)
            self.agent.release(handle)
            assert state == "DONE"

    def send(self, **kind) -> None:
        self.requests.put(decode_pb2.KvWriteRequest(**kind))

    def end(self) -> None:
        self.requests.put(None)


def _stats(stub) -> decode_pb2.DecodeStats:
    return stub.Stats(decode_pb2.StatsRequest(), timeout=10)


def _reserve(stub, tokens: int, lease_ms: int = 0) -> decode_pb2.ReserveResponse:
    return stub.Reserve(decode_pb2.ReserveRequest(num_prompt_tokens=tokens, max_new_tokens=1, lease_ms=lease_ms),
                        timeout=10)


def _fill(pool: KvPool, byte: int) -> None:
    for tensor in pool_tensors(pool):
        tensor.view(torch.uint8).fill_(byte)


def _block_bytes(pool: KvPool, blocks) -> list[torch.Tensor]:
    return [torch.cat([t[:, b * 16:(b + 1) * 16] for b in blocks], 1).view(torch.uint8).clone()
            for t in pool_tensors(pool)]


def test_a_late_write_into_a_released_reservation_lands_in_fenced_blocks_and_reuse_waits(decode_instance):
    """The race, forced: a reservation is released while its writer still writes. Its blocks stay out of reuse
    (a reservation that needs them is refused: the pool has no other room) while the writer goes on writing
    late; once the writer says it stopped, the same reservation succeeds, and nothing the late writer sent
    changes the blocks after that."""
    running, stub, info, pool, agent = decode_instance
    decode_pool = running.engine.runner.kv
    first = _reserve(stub, 64)  # 4 of the 6 blocks
    writer = RawWriter(stub, agent, first.handle, info.fingerprint)
    blocks = list(writer.target.block_ids)
    _fill(pool, 0x11)
    writer.write_all()
    assert all(bool((t == 0x11).all()) for t in _block_bytes(decode_pool, blocks))

    assert stub.Release(decode_pb2.ReleaseRequest(handle=first.handle), timeout=10).released
    assert writer.reply().revoke.reason == "the reservation was released"
    stats = _stats(stub)
    assert (stats.num_fenced_blocks, stats.num_blocks_free) == (4, NUM_BLOCKS - 4)
    with pytest.raises(grpc.RpcError) as raised:
        _reserve(stub, 64)  # needs the fenced blocks: refused, not handed out under the writer
    assert raised.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED

    _fill(pool, 0x22)
    writer.write_all()  # late: lands in the fenced blocks, which nobody else holds
    writer.send(stop=decode_pb2.KvWriteStop())
    writer.end()
    wait_for(lambda: _stats(stub).num_fenced_blocks == 0, 5, "the fence lifted after the writer's stop")
    second = _reserve(stub, 64)
    reused = RawWriter(stub, agent, second.handle, info.fingerprint)
    assert set(reused.target.block_ids) == set(blocks)  # the same blocks, reused only now
    after_reuse = _block_bytes(decode_pool, blocks)
    time.sleep(0.2)
    assert all(torch.equal(a, b) for a, b in zip(after_reuse, _block_bytes(decode_pool, blocks)))
    reused.send(stop=decode_pb2.KvWriteStop())
    reused.end()
    assert stub.Release(decode_pb2.ReleaseRequest(handle=second.handle), timeout=10).released
    wait_for(lambda: _stats(stub).num_blocks_free == NUM_BLOCKS, 5, "every block free")


def test_a_broken_stream_fences_a_released_reservation_for_the_fence_time(decode_instance):
    running, stub, info, pool, agent = decode_instance
    reserved = _reserve(stub, 32)
    writer = RawWriter(stub, agent, reserved.handle, info.fingerprint)
    writer.call.cancel()  # as a killed writer's connection would: neither commit nor stop
    time.sleep(0.3)
    released_at = time.monotonic()
    assert stub.Release(decode_pb2.ReleaseRequest(handle=reserved.handle), timeout=10).released
    assert _stats(stub).num_fenced_blocks == 2
    wait_for(lambda: _stats(stub).num_fenced_blocks == 0, 10, "the fence lifted after --nixl-fence-ms")
    held_s = time.monotonic() - released_at
    assert FENCE_MS / 1000 - 0.5 <= held_s <= FENCE_MS / 1000 + 1.5  # the break came 0.3 s before the release
    assert _stats(stub).num_blocks_free == NUM_BLOCKS


def test_a_lease_that_ends_mid_transfer_is_revoked_and_the_prefill_writer_stops(decode_instance):
    """The prefill tier's own sender: one layer written, then nothing for longer than the lease. Decode revokes,
    the sender stops and says so, every block is free, and the sender's wait() names the revocation."""
    running, stub, info, pool, agent = decode_instance
    reserved = _reserve(stub, 40, lease_ms=300)
    sender = NixlKvSender(stub, agent, handle=reserved.handle, fingerprint=info.fingerprint, kv_skip=0,
                          request_id="lease-test", trace_parent=None, timeout_s=30)
    sender.source([0, 1, 2])
    rows = KvRows(torch.zeros(32, info.num_kv_heads, info.head_dim), torch.zeros(32, info.num_kv_heads, info.head_dim))
    sender.send(0, 0, rows)  # layer 0's first two blocks; the rest never comes
    wait_for(lambda: _stats(stub).num_leases_expired, 10, "the lease expired")
    wait_for(lambda: _stats(stub).num_blocks_free == NUM_BLOCKS, 10, "the writer stopped and the blocks came back")
    with pytest.raises(Aborted, match="revoked the KV write .* its lease ended"):
        sender.wait()
    assert _stats(stub).num_fenced_blocks == 0


def test_a_write_stream_is_checked_before_anything_is_written(decode_instance):
    running, stub, info, pool, agent = decode_instance
    reserved = _reserve(stub, 20)
    cases = [(dict(handle=reserved.handle, fingerprint="0" * 64, writer_agent="w"), "FAILED_PRECONDITION",
              "KV layout mismatch"),
             (dict(handle="kv-nope", fingerprint=info.fingerprint, writer_agent="w"), "NOT_FOUND", "no KV reservation"),
             (dict(handle=reserved.handle, fingerprint=info.fingerprint, writer_agent=""), "INVALID_ARGUMENT",
              "writer_agent"),
             (dict(handle=reserved.handle, fingerprint=info.fingerprint, writer_agent="w", token_start=16),
              "INVALID_ARGUMENT", "write from there")]
    for fields, code, message in cases:
        with pytest.raises(grpc.RpcError) as raised:
            list(stub.WriteKv(iter([decode_pb2.KvWriteRequest(open=decode_pb2.KvWriteOpen(**fields))]), timeout=10))
        assert (raised.value.code().name, message in raised.value.details()) == (code, True), raised.value.details()
    # A commit short of the prompt, or of KV that holds NaN, is refused, and the reservation is not admitted.
    for token_end, fill, message in ((16, 0x00, "covers tokens up to 16; the reservation holds 20"),
                                     (20, 0xFF, "NaN")):  # 0xFF bytes: every float32 a NaN
        writer = RawWriter(stub, agent, reserved.handle, info.fingerprint)
        _fill(pool, fill)
        writer.write_all()
        writer.send(commit=decode_pb2.KvWriteCommit(num_bytes=1, num_writes=1, token_end=token_end))
        wait_for(writer.call.done, 10, "the stream ended")
        assert writer.call.code() == grpc.StatusCode.INVALID_ARGUMENT and message in writer.call.details()
        writer.end()
    assert _stats(stub).num_reserved == 1 and _stats(stub).num_fenced_blocks == 0
    assert stub.Release(decode_pb2.ReleaseRequest(handle=reserved.handle), timeout=10).released
    wait_for(lambda: _stats(stub).num_blocks_free == NUM_BLOCKS, 5, "every block free")
