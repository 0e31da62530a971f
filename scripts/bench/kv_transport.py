"""Raw KV transport across two processes on this host: GB/s moving 1, 16 and 256 MiB of the default model's KV
(30 layers, 3 KV heads, head_dim 64, float32, blocks of 16 tokens) from a prefill-side pool into a decode-side pool.

  nixl    one-sided NIXL WRITEs (UCX), one per layer, into the decode pool's blocks from prepared descriptor lists
          (common/kv/nixl_transport.py, as --kv-transport nixl posts them); timed until every WRITE is DONE (flushed
          into the decode process's memory). The decode process checks the bytes once at the end.
  grpc    pdserve's own path: GrpcKvSender (Decode.PushKv, one chunk per layer and 256-token prefill chunk,
          raw bytes + CRC-32) into receive_chunks on a loopback gRPC server in the decode process, which checks each
          chunk and writes it into its pool (the real Decode service is not started; no TLS). Timed until the ack.
  memcpy  a plain torch copy of the same bytes in one process (1 thread): the ceiling for a host copy.

Times are CLOCK_MONOTONIC, shared by both processes. Usage (about a minute on 2 cores):
  PYTHONPATH=. python scripts/bench/kv_transport.py [--sizes-mib 1 16 256] [--repeats 3] [--ucx-param k=v]
"""

import argparse
import math
import multiprocessing as mp
import signal
import statistics
import sys
import time

import torch

LAYERS, KV_HEADS, HEAD_DIM, BLOCK_SIZE, CHUNK_TOKENS = 30, 3, 64, 16, 256
TOKEN_BYTES = 2 * LAYERS * KV_HEADS * HEAD_DIM * 4  # K and V in float32: 45 KiB per token


def make_pool(num_blocks: int):
    from common.kv.pool import KvPool
    return KvPool(num_layers=LAYERS, num_blocks=num_blocks, block_size=BLOCK_SIZE, num_kv_heads=KV_HEADS,
                  head_dim=HEAD_DIM, dtype=torch.float32)


def compat():
    from common.basics.compat import Compat
    return Compat(model_id="bench", weights_digest="-", kv_dtype="float32", block_size=BLOCK_SIZE, num_layers=LAYERS,
                  num_kv_heads=KV_HEADS, head_dim=HEAD_DIM)


class PoolReceiver:
    """KvReceiver over a pool: each transfer fills blocks 0.. of the pool, every layer up to num_tokens."""

    def __init__(self, pool, num_tokens: int) -> None:
        self.pool, self.num_tokens = pool, num_tokens
        self.slots = pool.slots(list(range(pool.num_blocks)), 0, num_tokens)
        self.received = [0] * LAYERS

    def receive_kv(self, handle, layer, start, rows) -> None:
        self.pool.write_rows(layer, self.slots[start:start + rows.num_tokens], rows)
        self.received[layer] = start + rows.num_tokens

    def transfer_complete(self, handle) -> bool:
        done = all(n == self.num_tokens for n in self.received)
        if done:
            self.received = [0] * LAYERS
        return done


def decode_process(conn, num_tokens: int, repeats: int, ucx_params: dict[str, str]) -> None:
    torch.set_num_threads(1)
    from common.edge.server import make_server
    from common.kv.grpc_transport import ack_to_proto, max_push_message_bytes, receive_chunks
    from common.kv.nixl_transport import NixlKvAgent, pool_tensors
    from pdserve.v1 import decode_pb2_grpc

    num_blocks = -(-num_tokens // BLOCK_SIZE)
    pool = make_pool(num_blocks)
    receiver = PoolReceiver(pool, num_tokens)

    class Servicer(decode_pb2_grpc.DecodeServicer):
        def PushKv(self, request_iterator, context):
            return ack_to_proto(receive_chunks(request_iterator, receiver, compat())[1])

    server = make_server(max_push_message_bytes(compat(), num_tokens), max_workers=4)
    decode_pb2_grpc.add_DecodeServicer_to_server(Servicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    agent = NixlKvAgent("decode", pool_tensors(pool), BLOCK_SIZE, ucx_params)
    conn.send((port, agent.metadata(), agent.pool_layout))
    expected = conn.recv()  # the writer's bytes, once its WRITEs are DONE
    conn.send(all(torch.equal(mine.view(torch.uint8), theirs.view(torch.uint8))
                  for mine, theirs in zip(pool_tensors(pool), expected)))
    conn.recv()
    server.stop(0)


def bench_memcpy(num_bytes: int, repeats: int) -> list[float]:
    src, dst = torch.ones(num_bytes, dtype=torch.uint8), torch.zeros(num_bytes, dtype=torch.uint8)
    times = []
    for _ in range(repeats):
        start = time.monotonic()
        dst.copy_(src)
        times.append(time.monotonic() - start)
    return times


def bench_nixl(conn, pool, metadata: bytes, layout, num_blocks: int, repeats: int, ucx_params) -> list[float]:
    from common.kv.nixl_transport import NixlKvAgent, pool_tensors
    agent = NixlKvAgent("prefill", pool_tensors(pool), BLOCK_SIZE, ucx_params)
    remote = agent.remote("decode", metadata, layout)  # the descriptors of the decode pool, prepared once
    blocks, times = list(range(num_blocks)), []
    for i in range(repeats + 1):  # the first connects: not timed
        start = time.monotonic()
        handles = [agent.write(remote, layer, blocks, blocks) for layer in range(LAYERS)]
        for handle in handles:
            while (state := agent.state(handle)) == "PROC":
                time.sleep(20e-6)
            agent.release(handle)
            if state != "DONE":
                raise RuntimeError(f"a NIXL WRITE ended {state}")
        if i:
            times.append(time.monotonic() - start)
    conn.send(pool_tensors(pool))
    if not conn.recv():
        raise RuntimeError("the decode pool does not hold the bytes NIXL reported written")
    agent.close()
    return times


def bench_grpc(port: int, pool, num_tokens: int, repeats: int) -> list[float]:
    from common.edge.server import make_channel
    from common.kv.grpc_transport import GrpcKvSender
    from pdserve.v1 import decode_pb2_grpc
    stub = decode_pb2_grpc.DecodeStub(make_channel(f"127.0.0.1:{port}"))
    slots = pool.slots(list(range(pool.num_blocks)), 0, num_tokens)
    chunks = [(layer, start, pool.read_rows(layer, slots[start:start + CHUNK_TOKENS]))  # as computed, per chunk
              for start in range(0, num_tokens, CHUNK_TOKENS) for layer in range(LAYERS)]
    times = []
    for i in range(repeats + 1):
        start = time.monotonic()
        sender = GrpcKvSender(stub, handle="bench", fingerprint=compat().fingerprint, kv_dtype="float32",
                              request_id=f"bench-{i}", trace_parent=None, timeout_s=120)
        for layer, token_start, rows in chunks:
            sender.send(layer, token_start, rows)
        sender.close()
        sender.wait()
        if i:
            times.append(time.monotonic() - start)
    return times


def run_size(size_mib: float, repeats: int, ucx_params: dict[str, str]) -> dict[str, tuple[int, list[float]]]:
    num_tokens = math.ceil(size_mib * 2**20 / TOKEN_BYTES / BLOCK_SIZE) * BLOCK_SIZE
    num_blocks, num_bytes = num_tokens // BLOCK_SIZE, num_tokens * TOKEN_BYTES
    ctx = mp.get_context("spawn")
    here, there = ctx.Pipe()
    decode = ctx.Process(target=decode_process, args=(there, num_tokens, repeats, ucx_params), daemon=True)
    decode.start()
    try:
        port, metadata, layout = here.recv()
        pool = make_pool(num_blocks)
        for tensor in (pool.key, pool.value):
            tensor.copy_(torch.randn(tensor.shape))
        results = {"memcpy": bench_memcpy(num_bytes, repeats),
                   "nixl": bench_nixl(here, pool, metadata, layout, num_blocks, repeats, ucx_params),
                   "grpc": bench_grpc(port, pool, num_tokens, repeats)}
        here.send(None)
        decode.join(10)
    finally:
        if decode.is_alive():
            decode.kill()
    return {name: (num_bytes, times) for name, times in results.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes-mib", type=float, nargs="+", default=[1, 16, 256])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--ucx-param", action="append", default=[], help="a UCX backend parameter, key=value")
    parser.add_argument("--timeout-s", type=int, default=300)
    args = parser.parse_args()
    torch.set_num_threads(1)
    signal.alarm(args.timeout_s)  # a hung transfer ends the run
    ucx_params = dict(item.split("=", 1) for item in args.ucx_param)
    print(f"{'MiB':>8} {'transport':>9} {'GB/s best':>10} {'GB/s median':>12} {'ms best':>9}  (share of memcpy, x grpc)")
    for size in args.sizes_mib:
        results = run_size(size, args.repeats, ucx_params)
        best = {name: min(times) for name, (_, times) in results.items()}
        for name, (num_bytes, times) in results.items():
            print(f"{num_bytes / 2**20:8.1f} {name:>9} {num_bytes / best[name] / 1e9:10.2f} "
                  f"{num_bytes / statistics.median(times) / 1e9:12.2f} {best[name] * 1e3:9.2f}  "
                  f"({best['memcpy'] / best[name]:.2f}, {best['grpc'] / best[name]:.2f})")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
