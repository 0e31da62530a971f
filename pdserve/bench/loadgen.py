"""The load generator: sends BenchRequests to a pdserve.v1.Gateway address, open loop (Poisson arrivals at a
given rate, whatever the server's pace) or closed loop (a fixed number of clients, each sending its next
request when the previous one ends), and times every streamed message on the client side.

Every run is bounded: at most len(requests) requests, and a hard deadline after which calls still open are
cut off by their gRPC deadline and recorded as failed.
"""

import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import grpc

from common.edge.server import Tls, make_channel
from pdserve.bench.workloads import BenchRequest, poisson_offsets_s
from pdserve.v1 import (
    common_pb2,
    decode_pb2,
    decode_pb2_grpc,
    gateway_pb2,
    gateway_pb2_grpc,
)

_MAX_MESSAGE_BYTES = 64 * 1024 * 1024


@dataclass
class RequestResult:
    index: int
    kind: str
    prompt_tokens: int  # the ids sent, or for a text request the server's usage count (0 until it arrives)
    max_new_tokens: int
    sent_s: float  # since the run started
    token_times_s: list[float] = field(default_factory=list)  # since sent, one entry per token received
    finish_reason: str = ""
    error: str = ""
    completion_tokens: int = 0  # as the server's usage reported
    prefill_ms: float = 0.0
    kv_transfer_ms: float = 0.0
    # From the last response's `speculation` (absent when the request did not speculate).
    speculated: bool = False
    spec_proposed: int = 0
    spec_accepted: int = 0
    spec_acceptance_rate: float = 0.0
    spec_tokens_per_verify_step: float = 0.0

    @property
    def num_tokens(self) -> int:
        return len(self.token_times_s)

    @property
    def ok(self) -> bool:
        return not self.error and self.num_tokens > 0


@dataclass
class LoadSpec:
    mode: str  # "poisson" or "closed"
    value: float  # requests/s (poisson) or clients (closed)
    max_duration_s: float
    seed: int = 0

    @property
    def label(self) -> str:
        if self.mode == "poisson":
            return f"poisson {self.value:g} req/s"
        return f"closed, {int(self.value)} client{'s' if int(self.value) != 1 else ''}"


def _to_proto(request: BenchRequest) -> gateway_pb2.GenerateRequest:
    proto = gateway_pb2.GenerateRequest(max_new_tokens=request.max_new_tokens, request_id=f"bench-{request.index}",
                                        sampling=common_pb2.SamplingParams(temperature=0.0))
    if request.text:
        proto.messages.messages.add(role="user", content=request.text)
    else:
        proto.prompt_token_ids.ids.extend(request.prompt_ids)
    return proto


def send_one(stub: gateway_pb2_grpc.GatewayStub, request: BenchRequest, run_started: float,
             deadline: float) -> RequestResult:
    sent = time.monotonic()
    result = RequestResult(request.index, request.kind, len(request.prompt_ids), request.max_new_tokens,
                           sent_s=sent - run_started)
    try:
        for reply in stub.Generate(_to_proto(request), timeout=max(deadline - sent, 0.001)):
            now = time.monotonic() - sent
            result.token_times_s.extend([now] * len(reply.token_ids))
            if reply.finish_reason:
                result.finish_reason = common_pb2.FinishReason.Name(reply.finish_reason)
                result.completion_tokens = reply.usage.completion_tokens
                result.prefill_ms = reply.timings.prefill_ms
                result.kv_transfer_ms = reply.timings.kv_transfer_ms
                if request.text:
                    result.prompt_tokens = reply.usage.prompt_tokens
            if reply.HasField("speculation"):
                s = reply.speculation
                result.speculated = True
                result.spec_proposed, result.spec_accepted = s.num_proposed, s.num_accepted
                result.spec_acceptance_rate = s.acceptance_rate
                result.spec_tokens_per_verify_step = s.tokens_per_verify_step
    except grpc.RpcError as error:
        result.error = error.code().name
    return result


def run_load(address: str, requests: list[BenchRequest], load: LoadSpec,
             on_done: Callable[[RequestResult], None] = lambda _: None) -> tuple[list[RequestResult], float]:
    """Runs requests against address; returns the results (in request order) and the run's wall time."""
    channel = grpc.insecure_channel(address, options=[("grpc.max_receive_message_length", _MAX_MESSAGE_BYTES)])
    stub = gateway_pb2_grpc.GatewayStub(channel)
    started = time.monotonic()
    deadline = started + load.max_duration_s
    try:
        if load.mode == "poisson":
            results = _open_loop(stub, requests, load, started, deadline, on_done)
        elif load.mode == "closed":
            results = _closed_loop(stub, requests, int(load.value), started, deadline, on_done)
        else:
            raise ValueError(f"load mode must be poisson or closed, got {load.mode!r}")
    finally:
        channel.close()
    return sorted(results, key=lambda r: r.index), time.monotonic() - started


def _open_loop(stub, requests, load: LoadSpec, started: float, deadline: float, on_done) -> list[RequestResult]:
    offsets = poisson_offsets_s(len(requests), load.value, load.seed)
    with ThreadPoolExecutor(max_workers=len(requests)) as pool:
        futures = []
        for request, offset in zip(requests, offsets):
            delay = started + offset - time.monotonic()
            if started + offset >= deadline:
                break  # arrivals past the deadline are never sent
            if delay > 0:
                time.sleep(delay)
            future = pool.submit(send_one, stub, request, started, deadline)
            future.add_done_callback(lambda f: on_done(f.result()))
            futures.append(future)
        return [f.result() for f in futures]


def _closed_loop(stub, requests, num_clients: int, started: float, deadline: float, on_done) -> list[RequestResult]:
    if num_clients < 1:
        raise ValueError(f"closed loop needs >= 1 client, got {num_clients}")
    pending = list(reversed(requests))
    results: list[RequestResult] = []
    lock = threading.Lock()

    def client() -> None:
        while time.monotonic() < deadline:
            with lock:
                if not pending:
                    return
                request = pending.pop()
            result = send_one(stub, request, started, deadline)
            on_done(result)
            with lock:
                results.append(result)

    threads = [threading.Thread(target=client, daemon=True) for _ in range(num_clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


class StatsPoller:
    """Samples a decode instance's Stats (running batch size, steps, tokens) every interval_s in a thread."""

    def __init__(self, address: str | None, tls: Tls | None = None, interval_s: float = 0.25) -> None:
        self.address = address
        self.tls = tls
        self.interval_s = interval_s
        # (seconds since start, running, steps, tokens, steps x mean batch size = sequences stepped)
        self.samples: list[tuple[float, int, int, int, float]] = []
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
                    self.samples.append((time.monotonic() - started, s.num_running, s.num_steps,
                                         s.num_tokens_generated, s.mean_batch_size * s.num_steps))
                except grpc.RpcError:
                    pass  # a busy or absent stats endpoint leaves a gap, not a failed run
                if stopping:
                    return  # that was the closing sample
                self._stop.wait(self.interval_s)
