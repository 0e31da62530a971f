"""Faults under `pdserve up --prefill-replicas 2 --decode-replicas 2`: a decode instance killed mid-stream is
left for another and the stream goes on identical to an undisturbed run; a prefill instance killed mid-prompt is
retried on the other; a dead instance is restarted by the launcher and comes back into rotation; SIGTERM drains
(NOT_SERVING at once, the streams it holds finish); the gateway says NOT_SERVING while no decode instance can
serve; a killed gateway is restarted while the tiers go on. Every instance's KV blocks are all free afterwards."""

import os
import signal
import threading

import grpc
import pytest
from helpers import assert_greedy_matches, collect, hf_greedy, request
from replicated import (
    NOT_SERVING,
    RESTART_TIMEOUT_S,
    SERVING,
    Replicated,
    replicated_stack,
)
from stack import paused, tier_identity
from stack_probes import instance_pids

from common.edge.server import health_status
from pdserve.v1 import common_pb2

PROMPT = "Once upon a time, in a small village by the sea, there lived"
LONG_PROMPT = ("The history of computing is a story of abstraction. Early machines were programmed by rewiring "
               "panels; later, stored programs let the same hardware run many tasks. ") * 60 + "In short,"
MAX_NEW_TOKENS = 40


@pytest.fixture(scope="module")
def replicated(model_dir):
    with replicated_stack(model_dir, "--drain-timeout-s", "60") as stack:
        yield stack


@pytest.fixture(autouse=True)
def every_instance_serving(replicated):
    """Each test starts from a whole stack (one that failed half-way may have left an instance restarting)."""
    replicated.wait_all_serving()


def _stream_after(stack: Replicated, req, tokens_before: int):
    """The stream of `req`, with its first `tokens_before` tokens already received (so decode is under way)."""
    stream = stack.gateway.Generate(req, timeout=300)
    received = []
    while len(received) < tokens_before:
        received += next(stream).token_ids
    return stream, received


def _rest(stream, received: list[int]):
    last = None
    for reply in stream:
        received += reply.token_ids
        last = reply
    return received, last


@pytest.mark.parametrize("sampled", [False, True], ids=["greedy", "sampled"])
def test_a_decode_instance_killed_mid_stream_is_left_for_another_and_the_stream_goes_on(replicated, hf_model,
                                                                                        sampled):
    sampling = common_pb2.SamplingParams(temperature=0.8, top_p=0.95, seed=7) if sampled else None
    req = request(PROMPT, max_new_tokens=MAX_NEW_TOKENS, speculative=False, sampling=sampling)
    undisturbed, _, undisturbed_last = collect(replicated.gateway, req)
    assert undisturbed_last.num_migrations == 0

    stream, received = _stream_after(replicated, req, 6)
    holder = replicated.holder()
    victim = replicated.pid(holder)
    os.kill(victim, signal.SIGKILL)  # it dies without a word
    tokens, last = _rest(stream, received)

    # No token repeated or missing: the whole stream is the undisturbed one (sampling draws by position, so a
    # seeded sampled stream is the same too).
    assert tokens == undisturbed
    assert last.num_migrations == 1 and last.usage.completion_tokens == len(undisturbed)
    if not sampled:
        prompt_ids = hf_model[1](PROMPT).input_ids
        assert_greedy_matches(hf_model, prompt_ids, tokens, hf_greedy(hf_model, prompt_ids, MAX_NEW_TOKENS))
    # The launcher restarts it; it comes back into rotation.
    replicated.wait_until(lambda: instance_pids(replicated.process.pid).get(holder, victim) != victim
                          and replicated.serving(holder),
                          RESTART_TIMEOUT_S, "the killed decode instance restarted")
    replicated.wait_all_serving()
    replicated.assert_no_blocks_held()


def test_a_prefill_instance_killed_mid_prompt_is_retried_on_the_other(replicated):
    req = request(LONG_PROMPT, max_new_tokens=12, speculative=False)
    undisturbed, _, _ = collect(replicated.gateway, req)

    outcome = {}
    thread = threading.Thread(target=lambda: outcome.update(result=collect(replicated.gateway, req)))
    thread.start()
    busy = []
    replicated.wait_until(lambda: busy.extend(a for a in replicated.prefills if replicated.prefill_stats(a).num_queued)
                          or busy, 30, "the prompt reached a prefill instance")
    os.kill(replicated.pid(busy[0]), signal.SIGKILL)
    thread.join(timeout=300)

    tokens, _, last = outcome["result"]
    assert tokens == undisturbed
    assert last.num_migrations == 0  # a retried prefill moved no stream: nothing had been sent
    replicated.wait_all_serving()
    replicated.assert_no_blocks_held()


def test_sigterm_drains_a_decode_instance_while_new_work_goes_to_the_other(replicated):
    req = request(PROMPT, max_new_tokens=MAX_NEW_TOKENS, speculative=False)
    undisturbed, _, _ = collect(replicated.gateway, req)

    stream, received = _stream_after(replicated, req, 4)
    holder = replicated.holder()
    other = next(a for a in replicated.decodes if a != holder)
    pid = replicated.pid(holder)
    os.kill(pid, signal.SIGTERM)
    # NOT_SERVING at once (the drain's first act), while its stream goes on.
    replicated.wait_until(lambda: health_status(holder, tls=tier_identity()) == NOT_SERVING, 2,
                          "the draining instance reports NOT_SERVING")
    # New work goes to the other instance meanwhile.
    before = replicated.decode_stats(other).num_tokens_generated
    fresh, _, _ = collect(replicated.gateway, request("The capital of France is", max_new_tokens=4,
                                                      speculative=False))
    assert len(fresh) == 4 and replicated.decode_stats(other).num_tokens_generated > before

    tokens, last = _rest(stream, received)
    assert tokens == undisturbed and last.num_migrations == 0  # finished where it was, not moved
    replicated.wait_until(lambda: instance_pids(replicated.process.pid).get(holder, pid) != pid, RESTART_TIMEOUT_S,
                          "the drained instance exited and was restarted")
    replicated.wait_all_serving()
    replicated.assert_no_blocks_held()


def test_the_gateway_is_not_serving_while_no_decode_instance_can_serve(replicated):
    gateway = replicated.addresses["gateway"]
    first, second = (replicated.pid(a) for a in replicated.decodes)
    with paused(first), paused(second):
        # Frozen instances leave rotation after MISSES_OUT unanswered checks (1 s apart, 1 s timeout each).
        replicated.wait_until(lambda: health_status(gateway) == NOT_SERVING, 30, "gateway NOT_SERVING")
        with pytest.raises(grpc.RpcError) as raised:
            collect(replicated.gateway, request("Hi", max_new_tokens=2), timeout=30)
        assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
    recovered_s = replicated.wait_until(lambda: health_status(gateway) == SERVING, 10, "gateway SERVING again")
    tokens, _, _ = collect(replicated.gateway, request("Hi", max_new_tokens=2))
    assert len(tokens) == 2, recovered_s
    replicated.assert_no_blocks_held()


def test_a_killed_gateway_is_restarted_and_the_tiers_keep_serving(replicated):
    """kill -9 of the gateway no longer takes the stack down: the launcher restarts it on its port, and the
    tiers (which never noticed) serve the next request."""
    gateway = replicated.addresses["gateway"]
    pid = replicated.pid(gateway)
    tier_pids = {a: replicated.pid(a) for a in (*replicated.decodes, *replicated.prefills)}
    os.kill(pid, signal.SIGKILL)
    replicated.wait_until(lambda: instance_pids(replicated.process.pid).get(gateway, pid) != pid
                          and health_status(gateway) == SERVING, RESTART_TIMEOUT_S, "the gateway restarted")
    assert {a: replicated.pid(a) for a in tier_pids} == tier_pids  # no tier was stopped or restarted
    tokens, _, last = collect(replicated.gateway, request(PROMPT, max_new_tokens=4, speculative=False))
    assert len(tokens) == 4 and last.num_migrations == 0
    replicated.assert_no_blocks_held()
