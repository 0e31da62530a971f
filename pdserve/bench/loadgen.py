"""The load generator: sends BenchRequests to a pdserve.v1.Gateway address (or, for an http:// address, to
llama.cpp's llama-server, pdserve/bench/llama_server.py), open loop (Poisson arrivals at a
given rate, whatever the server's pace) or closed loop (a fixed number of clients, each sending its next
request when the previous one ends), and times every streamed message on the client side.

Requests of one session (BenchRequest.session: a conversation's turns, a document's questions) go in order,
each once the one before it has ended, its prompt built from the previous turn's prompt and reply
(BenchRequest.prompt_after); a session ends early when one of its requests fails. Open loop, sessions arrive
at the Poisson rate (a request outside any session is a session of one); closed loop, a client takes the
next session and sends its requests one after another.

Every run is bounded: at most len(requests) requests, and a hard deadline after which calls still open are
cut off by their gRPC deadline and recorded as failed. A request the server refuses for room
(RESOURCE_EXHAUSTED) fails, or with LoadSpec.retry_refused is sent again after the delay the server asks for
(grpc-retry-pushback-ms), as a client that honours it would, its times counted from the first attempt.
"""

import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import grpc

from pdserve.bench.llama_server import SCHEME, LlamaServerClient, LlamaServerError
from pdserve.bench.workloads import BenchRequest, poisson_offsets_s
from pdserve.client import Client, retry_after_s
from pdserve.v1 import common_pb2, gateway_pb2

_DEFAULT_RETRY_S = 0.1  # a refusal that asks for no delay is retried after this
_MAX_RETRY_S = 5.0


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
    # From the last response: prompt tokens whose KV came from a prefix cache, KV bytes pushed prefill ->
    # decode, and where the prompt was prefilled ("prefill-tier" or "decode-local"; empty if not reported).
    cached_tokens: int = 0
    kv_bytes: int = 0
    prefill_path: str = ""
    session: int | None = None
    token_ids: list[int] = field(default_factory=list)  # the reply: a later turn's prompt holds it
    retry_after_s: float = 0.0  # a refusal's asked delay (grpc-retry-pushback-ms)
    num_refused: int = 0  # attempts the server refused for room before this one (with retry_refused)
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
    retry_refused: bool = False  # send a request refused for room (RESOURCE_EXHAUSTED) again after the delay

    @property
    def label(self) -> str:
        if self.mode == "poisson":
            return f"poisson {self.value:g} req/s"
        return f"closed, {int(self.value)} client{'s' if int(self.value) != 1 else ''}"


def _to_proto(request: BenchRequest, prompt_ids: tuple[int, ...] | None = None) -> gateway_pb2.GenerateRequest:
    """prompt_ids: what a later turn sends (BenchRequest.prompt_after); the request's own when None."""
    proto = gateway_pb2.GenerateRequest(max_new_tokens=request.max_new_tokens, request_id=f"bench-{request.index}",
                                        sampling=common_pb2.SamplingParams(temperature=0.0))
    if request.text:
        proto.messages.messages.add(role="user", content=request.text)
    else:
        proto.prompt_token_ids.ids.extend(request.prompt_ids if prompt_ids is None else prompt_ids)
    return proto


def send_one(client: Client | LlamaServerClient, request: BenchRequest, run_started: float,
             deadline: float, prompt_ids: tuple[int, ...] | None = None) -> RequestResult:
    sent = time.monotonic()
    proto = _to_proto(request, prompt_ids)
    result = RequestResult(request.index, request.kind, len(proto.prompt_token_ids.ids), request.max_new_tokens,
                           sent_s=sent - run_started, session=request.session)
    try:
        # no retries here: refusals are the bench's to count (send_admitted)
        for reply in client.stream(proto, timeout_s=max(deadline - sent, 0.001), retries=0):
            now = time.monotonic() - sent
            result.token_times_s.extend([now] * len(reply.token_ids))
            result.token_ids.extend(reply.token_ids)
            if reply.finish_reason:
                result.finish_reason = common_pb2.FinishReason.Name(reply.finish_reason)
                result.completion_tokens = reply.usage.completion_tokens
                result.cached_tokens = reply.usage.cached_tokens
                result.prefill_ms = reply.timings.prefill_ms
                result.kv_transfer_ms = reply.timings.kv_transfer_ms
                result.kv_bytes = reply.timings.kv_bytes
                result.prefill_path = reply.timings.prefill_path
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
        result.retry_after_s = _pushback_s(error)
    except LlamaServerError as error:
        result.error = error.code_name
    return result


def _pushback_s(error: grpc.RpcError) -> float:
    asked = retry_after_s(error)
    return min(asked, _MAX_RETRY_S) if asked is not None else _DEFAULT_RETRY_S


def send_admitted(client: Client, request: BenchRequest, run_started: float, deadline: float,
                  prompt_ids: tuple[int, ...] | None = None, retry_refused: bool = False) -> RequestResult:
    """send_one; with retry_refused, sent again while the server refuses it for room, after the delay it asks
    for, until the deadline. The result's times then count from the first attempt."""
    first_sent_s = time.monotonic() - run_started
    num_refused = 0
    while True:
        result = send_one(client, request, run_started, deadline, prompt_ids)
        if (not retry_refused or result.error != "RESOURCE_EXHAUSTED"
                or time.monotonic() + result.retry_after_s >= deadline):
            break
        num_refused += 1
        time.sleep(result.retry_after_s)
    if num_refused:
        waited_s = result.sent_s - first_sent_s
        result.sent_s, result.num_refused = first_sent_s, num_refused
        result.token_times_s = [t + waited_s for t in result.token_times_s]
    return result


def run_load(address: str, requests: list[BenchRequest], load: LoadSpec,
             on_done: Callable[[RequestResult], None] = lambda _: None) -> tuple[list[RequestResult], float]:
    """Runs requests against address; returns the results (in request order) and the run's wall time."""
    client = LlamaServerClient(address) if address.startswith(SCHEME) else Client(address)
    started = time.monotonic()
    deadline = started + load.max_duration_s
    try:
        if load.mode == "poisson":
            results = _open_loop(client, requests, load, started, deadline, on_done)
        elif load.mode == "closed":
            results = _closed_loop(client, requests, int(load.value), started, deadline, on_done,
                                   load.retry_refused)
        else:
            raise ValueError(f"load mode must be poisson or closed, got {load.mode!r}")
    finally:
        client.close()
    return sorted(results, key=lambda r: r.index), time.monotonic() - started


def sessions(requests: list[BenchRequest]) -> list[list[BenchRequest]]:
    """The requests grouped by session, each in index order, sessions in the order of their first request; a
    request outside any session is a session of one."""
    grouped: dict[object, list[BenchRequest]] = {}
    for request in sorted(requests, key=lambda r: r.index):
        key = ("session", request.session) if request.session is not None else ("alone", request.index)
        grouped.setdefault(key, []).append(request)
    return list(grouped.values())


def run_session(client: Client, session: list[BenchRequest], started: float, deadline: float, on_done,
                retry_refused: bool = False) -> list[RequestResult]:
    """Sends a session's requests one after another, each once the one before it has ended; stops at the
    deadline or at the first failure (a later turn needs the reply)."""
    results: list[RequestResult] = []
    prompt: tuple[int, ...] = ()
    for request in session:
        if time.monotonic() >= deadline:
            break
        previous_reply = tuple(results[-1].token_ids) if results else ()
        prompt = request.prompt_after(prompt, previous_reply)
        result = send_admitted(client, request, started, deadline, prompt, retry_refused)
        on_done(result)
        results.append(result)
        if not result.ok:
            break
    return results


def _open_loop(client: Client, requests, load: LoadSpec, started: float, deadline: float,
               on_done) -> list[RequestResult]:
    grouped = sessions(requests)
    offsets = poisson_offsets_s(len(grouped), load.value, load.seed)
    with ThreadPoolExecutor(max_workers=len(grouped)) as pool:
        futures = []
        for session, offset in zip(grouped, offsets):
            delay = started + offset - time.monotonic()
            if started + offset >= deadline:
                break  # arrivals past the deadline are never sent
            if delay > 0:
                time.sleep(delay)
            futures.append(pool.submit(run_session, client, session, started, deadline, on_done, load.retry_refused))
        return [result for f in futures for result in f.result()]


def _closed_loop(client: Client, requests, num_clients: int, started: float, deadline: float, on_done,
                 retry_refused: bool = False) -> list[RequestResult]:
    if num_clients < 1:
        raise ValueError(f"closed loop needs >= 1 client, got {num_clients}")
    pending = list(reversed(sessions(requests)))
    results: list[RequestResult] = []
    lock = threading.Lock()

    def one_client() -> None:
        while time.monotonic() < deadline:
            with lock:
                if not pending:
                    return
                session = pending.pop()
            done = run_session(client, session, started, deadline, on_done, retry_refused)
            with lock:
                results.extend(done)

    threads = [threading.Thread(target=one_client, daemon=True) for _ in range(num_clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results
