"""Samples a decode instance's Stats through a run, in a thread: the batch it runs, the tokens it makes, its KV
pool's preemptions and prefix cache."""

import threading
import time
from typing import NamedTuple

import grpc

from common.edge.server import Tls, make_channel
from pdserve.v1 import decode_pb2, decode_pb2_grpc


class StatsSample(NamedTuple):
    """One reading of a decode instance's Stats; the counters count since the instance started."""

    t_s: float  # since the poller started
    num_running: int
    num_steps: int
    num_tokens: int
    num_stepped: float  # steps x mean batch size: sequences stepped
    max_batch_size: int  # the largest batch a step has run
    num_preemptions: int
    num_preempted_waiting: int
    num_cached_blocks: int
    num_prefix_query_tokens: int
    num_prefix_hit_tokens: int
    num_local_prefills: int


class StatsPoller:
    """Samples a decode instance's Stats (running batch size, steps, tokens, the KV pool's preemptions and prefix
    cache) every interval_s in a thread."""

    def __init__(self, address: str | None, tls: Tls | None = None, interval_s: float = 0.25) -> None:
        self.address = address
        self.tls = tls
        self.interval_s = interval_s
        self.samples: list[StatsSample] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def __enter__(self) -> "StatsPoller":
        if self.address:
            self._thread.start()
        return self

    def __exit__(self, *_) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def _poll(self) -> None:
        started = time.monotonic()
        with make_channel(self.address, self.tls) as channel:
            stub = decode_pb2_grpc.DecodeStub(channel)
            while True:
                stopping = self._stop.is_set()
                try:
                    s = stub.Stats(decode_pb2.StatsRequest(), timeout=2.0)
                    self.samples.append(StatsSample(
                        time.monotonic() - started, s.num_running, s.num_steps, s.num_tokens_generated,
                        s.mean_batch_size * s.num_steps, s.max_batch_size, s.num_preemptions,
                        s.num_preempted_waiting, s.num_cached_blocks, s.num_prefix_query_tokens,
                        s.num_prefix_hit_tokens, s.num_local_prefills))
                except grpc.RpcError:
                    pass  # a busy or absent stats endpoint leaves a gap, not a failed run
                if stopping:
                    return  # that was the closing sample
                self._stop.wait(self.interval_s)
