"""The chaos suite: faults of every tier under load, on loopback, bounded in time (`make chaos`; not in `make test`).

One stack under `pdserve up --prefill-replicas 2 --decode-replicas 2`. For each fault (SIGKILL, SIGSTOP for
FREEZE_S, SIGTERM of each tier), CLIENTS clients send greedy requests back to back for LOAD_S; the fault comes
FAULT_AFTER_S in. Clients behave as a platform's clients do: a request turned away before it started
(UNAVAILABLE, or RESOURCE_EXHAUSTED with its grpc-retry-pushback-ms) is sent again, for at most RETRY_FOR_S.
Then, once quiet, the figures: requests accepted (a first token came back), accepted requests lost (ended
without their whole output), tokens duplicated or missing (any difference from the request's undisturbed
output), KV blocks held on each instance, migrations, and the time from the fault (or the thaw) until every
instance and the gateway serve again. A stream the dying gateway itself carried cannot survive it (the client
holds that connection): such streams are counted apart, sent again by the client, and must then complete.

Last, an overload of OVERLOAD_FACTOR times the admitted capacity at once: the excess is refused at once with
RESOURCE_EXHAUSTED and a retry delay, and everything admitted completes exactly.

Figures print as a table (pytest -s); docs/reliability.md keeps them with the machine that made them."""

import os
import signal
import statistics
import threading
import time
import uuid
from dataclasses import dataclass, field

import grpc
import pytest
from helpers import request
from replicated import Replicated, replicated_stack

from common.runtime.machine import describe_machine
from pdserve.v1 import gateway_pb2_grpc

pytestmark = pytest.mark.chaos

PROMPTS = [
    "The capital of France is",
    "Once upon a time, in a small village by the sea, there lived",
    "def fibonacci(n):\n    ",
    "List three primary colors:",
    ("The history of computing is a story of abstraction. Early machines were programmed by rewiring panels; "
     "later, stored programs let the same hardware run many tasks. ") * 8 + "In short,",
]
MAX_NEW_TOKENS = 24
CLIENTS = 4
LOAD_S = 14.0
FAULT_AFTER_S = 3.0
FREEZE_S = 6.0
RETRY_FOR_S = 90.0
MAX_BATCH_SIZE = 4  # small, so that the overload is 10x of something measurable
OVERLOAD_FACTOR = 10
LEASE_S = 30.0  # DecodeConfig.lease_ms, the stack's default
FAULTS = [(tier, sig) for tier in ("decode", "prefill", "gateway") for sig in ("SIGKILL", "SIGSTOP", "SIGTERM")]
_CHANNEL_OPTIONS = [("grpc.initial_reconnect_backoff_ms", 200), ("grpc.max_reconnect_backoff_ms", 1000)]


@dataclass
class Outcome:
    prompt: int
    tokens: list[int] = field(default_factory=list)
    accepted: bool = False
    completed: bool = False
    broken_by_gateway: int = 0  # streams the gateway carried when it died, sent again
    resent: int = 0  # times turned away before starting (UNAVAILABLE or RESOURCE_EXHAUSTED) and sent again
    migrations: int = 0
    error: str = ""


def _send(stub, prompt: int, deadline: float) -> Outcome:
    """One request as a careful client sends it: again while it is turned away before starting."""
    outcome, request_id = Outcome(prompt), f"chaos-{uuid.uuid4().hex[:12]}"
    while True:
        tokens, started = [], False
        try:
            for reply in stub.Generate(request(PROMPTS[prompt], max_new_tokens=MAX_NEW_TOKENS, speculative=False),
                                       timeout=120, metadata=[("x-request-id", request_id)]):
                started = outcome.accepted = True
                tokens += reply.token_ids
                if reply.finish_reason:
                    outcome.migrations = reply.num_migrations
            outcome.tokens, outcome.completed = tokens, True
            return outcome
        except grpc.RpcError as error:
            code = error.code()
            if started:
                if code != grpc.StatusCode.UNAVAILABLE:
                    outcome.tokens, outcome.error = tokens, f"{code.name}: {error.details()}"
                    return outcome
                outcome.broken_by_gateway += 1  # only the gateway's own death ends a started stream so
            elif code not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED):
                outcome.error = f"{code.name}: {error.details()}"
                return outcome
            outcome.resent += not started
            if time.monotonic() > deadline:
                outcome.error = f"still turned away after {RETRY_FOR_S} s: {code.name}"
                return outcome
            time.sleep(_pushback_s(error) or 0.2)


def _pushback_s(error: grpc.RpcError) -> float | None:
    for item in error.trailing_metadata() or ():
        if item.key == "grpc-retry-pushback-ms":
            return int(item.value) / 1000
    return None


def _load(stack: Replicated, stop: threading.Event, outcomes: list[Outcome]) -> list[threading.Thread]:
    def client(index: int) -> None:
        with grpc.insecure_channel(stack.addresses["gateway"], options=_CHANNEL_OPTIONS) as channel:
            stub, turn = gateway_pb2_grpc.GatewayStub(channel), index
            while not stop.is_set():
                outcomes.append(_send(stub, turn % len(PROMPTS), time.monotonic() + RETRY_FOR_S))
                turn += 1

    threads = [threading.Thread(target=client, args=(i,)) for i in range(CLIENTS)]
    for thread in threads:
        thread.start()
    return threads


def _inject(stack: Replicated, tier: str, sig: str) -> float:
    """Sends the fault to replica 0 of the tier (the gateway for "gateway"); returns when recovery is timed from."""
    address = stack.addresses["gateway" if tier == "gateway" else f"{tier}-0"]
    pid = stack.pid(address)
    if sig == "SIGSTOP":
        os.kill(pid, signal.SIGSTOP)
        time.sleep(FREEZE_S)
        os.kill(pid, signal.SIGCONT)
    else:
        os.kill(pid, getattr(signal, sig))
    return time.monotonic()


def _recovered_s(stack: Replicated, since: float) -> float:
    """Seconds from `since` until every instance serves again and is back in the gateway's rotation."""
    stack.wait_all_serving()
    return time.monotonic() - since


def _blocks_held(stack: Replicated) -> tuple[int, float]:
    """KV blocks held on all instances together once quiet, and how long they took to come free. Blocks whose
    holder died (a reservation filled for a gateway that is gone) are freed by their lease, so this waits up to
    a lease and a margin: what is still held then is leaked."""
    started = time.monotonic()
    while True:
        held = sum(s.num_blocks_total - s.num_blocks_free for s in map(stack.decode_stats, stack.decodes))
        held += sum(s.num_blocks_total - s.num_blocks_free for s in map(stack.prefill_stats, stack.prefills))
        if held == 0 or time.monotonic() - started > LEASE_S + 5:
            return held, time.monotonic() - started
        time.sleep(0.2)


def _wrong_tokens(outcomes: list[Outcome], reference: list[list[int]]) -> int:
    """Tokens duplicated, missing or different, over the completed requests, against each undisturbed output."""
    wrong = 0
    for o in outcomes:
        if o.completed:
            expected = reference[o.prompt]
            wrong += sum(a != b for a, b in zip(o.tokens, expected)) + abs(len(o.tokens) - len(expected))
    return wrong


@pytest.fixture(scope="module")
def chaos_stack(model_dir):
    with replicated_stack(model_dir, "--max-batch-size", str(MAX_BATCH_SIZE), "--drain-timeout-s", "20") as stack:
        yield stack


@pytest.fixture(scope="module")
def reference(chaos_stack) -> list[list[int]]:
    """Each prompt's undisturbed greedy output, from the same stack before any fault."""
    with grpc.insecure_channel(chaos_stack.addresses["gateway"]) as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)
        return [_send(stub, i, time.monotonic() + 60).tokens for i in range(len(PROMPTS))]


ROWS: list[str] = []


@pytest.mark.parametrize("tier, sig", FAULTS, ids=[f"{t}-{s}" for t, s in FAULTS])
def test_a_fault_under_load_loses_nothing(chaos_stack, reference, tier, sig):
    stop, outcomes = threading.Event(), []
    started = time.monotonic()
    threads = _load(chaos_stack, stop, outcomes)
    time.sleep(FAULT_AFTER_S)
    since = _inject(chaos_stack, tier, sig)
    time.sleep(max(started + LOAD_S - time.monotonic(), 0))
    stop.set()
    for thread in threads:
        thread.join(timeout=RETRY_FOR_S + 130)
    recovery_s = _recovered_s(chaos_stack, since)
    held, freed_s = _blocks_held(chaos_stack)

    accepted = [o for o in outcomes if o.accepted]
    lost = [o for o in accepted if not o.completed]
    errors = sorted({o.error for o in outcomes if o.error})
    wrong = _wrong_tokens(outcomes, reference)
    row = (f"| {tier} | {sig} | {len(outcomes)} | {len(accepted)} | {len(lost)} | {wrong} | {held} | {freed_s:.1f} | "
           f"{sum(o.migrations for o in outcomes)} | {sum(o.resent for o in outcomes)} | "
           f"{sum(o.broken_by_gateway for o in outcomes)} | {recovery_s:.1f} |")
    ROWS.append(row)
    print(row, errors)
    assert not lost and not errors, errors
    assert wrong == 0 and held == 0


def test_overload_at_ten_times_capacity_is_refused_at_once_and_what_is_admitted_completes(chaos_stack, reference):
    capacity = 2 * MAX_BATCH_SIZE * len(chaos_stack.decodes)  # admission_factor 2 (the default) per batch slot
    count = OVERLOAD_FACTOR * capacity
    results: list[tuple[str, float, list[int], int, float | None]] = [None] * count  # type: ignore[list-item]
    barrier = threading.Barrier(count)

    def one(index: int) -> None:
        prompt = index % len(PROMPTS)
        barrier.wait()
        sent, tokens = time.monotonic(), []
        try:
            for reply in chaos_stack.gateway.Generate(request(PROMPTS[prompt], max_new_tokens=MAX_NEW_TOKENS,
                                                              speculative=False), timeout=300):
                tokens += reply.token_ids
            results[index] = ("OK", time.monotonic() - sent, tokens, prompt, None)
        except grpc.RpcError as error:
            results[index] = (error.code().name, time.monotonic() - sent, tokens, prompt, _pushback_s(error))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=600)
    admitted = [r for r in results if r[0] == "OK"]
    refused = [r for r in results if r[0] == "RESOURCE_EXHAUSTED"]
    others = [r[0] for r in results if r[0] not in ("OK", "RESOURCE_EXHAUSTED")]
    wrong = sum(r[2] != reference[r[3]] for r in admitted)
    refusal_ms = sorted(r[1] * 1000 for r in refused)
    held, _ = _blocks_held(chaos_stack)
    summary = (f"overload {count} at once (capacity {capacity}): admitted {len(admitted)}, refused "
               f"{len(refused)} (all with pushback: {all(r[4] for r in refused)}; refusal ms p50 "
               f"{statistics.median(refusal_ms):.0f} max {refusal_ms[-1]:.0f}), other {others}, wrong outputs "
               f"{wrong}, blocks held {held}")
    ROWS.append(summary)
    print(summary)
    assert not others and wrong == 0 and held == 0
    assert refused and all(r[4] for r in refused)
    assert len(admitted) >= capacity


def test_print_the_table():
    print(f"\nchaos figures on {describe_machine()}\n"
          "| tier | fault | requests | accepted | lost | wrong tokens | blocks leaked | s until all blocks free "
          "| migrations | turned away, resent | gateway streams resent | recovery s |\n"
          "|---|---|---|---|---|---|---|---|---|---|---|---|")
    print("\n".join(ROWS))
