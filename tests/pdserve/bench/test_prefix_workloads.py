"""The prefix-caching workloads (multi-turn chat, document QA) and what the harness does with them: seeded
token ids in the model's chat template, sessions sent in order with the real replies in the history, the
issue-16 peers' flags, and the figures read from the responses and decode Stats (no servers)."""

import argparse
import itertools
import threading
import time
from pathlib import Path

import grpc
import pytest

from pdserve.bench import report
from pdserve.bench.loadgen import LoadSpec, RequestResult, _closed_loop, _open_loop
from pdserve.bench.metrics import decode_kv, prefix_reuse
from pdserve.bench.peer_process import PeerOptions
from pdserve.bench.peers import (
    NO_LOCAL_PREFILL_FLAGS,
    NO_PREFIX_CACHE_FLAGS,
    UPFRONT_FLAGS,
    stack_command,
)
from pdserve.bench.sessions import ChatMl, document
from pdserve.bench.stats_poller import StatsSample
from pdserve.bench.texts import SYSTEM_PROMPT
from pdserve.bench.workloads import WORKLOADS, make_requests, workload_requests
from pdserve.launcher import add_up_arguments
from pdserve.v1 import common_pb2, gateway_pb2

EOS = 2  # the default model's <|im_end|>


def _sessions(requests):
    grouped = {}
    for r in requests:
        grouped.setdefault(r.session, []).append(r)
    return list(grouped.values())


def _common_prefix(a, b) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


@pytest.mark.parametrize("name", ["multi-turn-chat", "document-qa"])
def test_session_workloads_are_the_same_for_the_same_seed_and_differ_across_seeds(tokenizer, name):
    workload = WORKLOADS[name]
    requests = make_requests(workload, 40, seed=3, tokenizer=tokenizer)
    assert requests == make_requests(workload, 40, seed=3, tokenizer=tokenizer)
    assert requests != make_requests(workload, 40, seed=4, tokenizer=tokenizer)
    assert [r.index for r in requests] == list(range(40))
    assert all(32 <= r.max_new_tokens <= 64 for r in requests)
    with pytest.raises(ValueError, match="tokenizer"):
        make_requests(workload, 4, seed=0)


def test_conversations_have_4_to_8_turns_and_all_open_with_the_same_500_token_system_prompt(tokenizer):
    requests = make_requests(WORKLOADS["multi-turn-chat"], 60, seed=0, tokenizer=tokenizer)
    conversations = _sessions(requests)
    assert all(4 <= len(c) <= 8 for c in conversations[:-1]) and 1 <= len(conversations[-1]) <= 8
    system = ChatMl(tokenizer).message("system", SYSTEM_PROMPT)
    assert 450 <= len(system) <= 560
    assert all(c[0].prompt_ids[:len(system)] == system and c[0].reply_close_ids is None for c in conversations)
    assert all(r.reply_close_ids == (EOS, *tokenizer.encode("\n")) for c in conversations for r in c[1:])
    assert {c[0].kind for c in conversations} == {"first-turn"} and {r.kind for c in conversations for r in c[1:]} == {
        "later-turn"}


def test_a_conversation_replayed_with_its_replies_is_the_chat_template_rendered_whole(tokenizer):
    """Each turn sends the previous prompt, the reply it got and the new user turn: token for token what the
    model's chat template renders for the whole history, a reply ended by EOS or cut by the length limit alike."""
    conversation = _sessions(make_requests(WORKLOADS["multi-turn-chat"], 8, seed=1, tokenizer=tokenizer))[0]
    answers = ["Sure. Start with short sessions and take breaks.", "Here is one: a kitchen timer set to 25 minutes.",
               "Most people try to do too much at once", "1. Pick a goal.\n2. Write it down.", "Keep going!",
               "Do not skip sleep.", "About two weeks.", "Ten minutes is enough."]
    messages = [{"role": "system", "content": SYSTEM_PROMPT}]
    prompt, reply = (), ()
    for turn, request in enumerate(conversation):
        prompt = request.prompt_after(prompt, reply)
        user = tokenizer.decode(list(request.prompt_ids)).split("user\n", 1)[1].rsplit("assistant\n", 1)[0]
        messages.append({"role": "user", "content": user.strip()})
        assert list(prompt) == tokenizer.apply_chat_template(messages)
        answer = answers[turn]
        reply = tuple(tokenizer.encode(answer)) + ((EOS,) if turn % 2 == 0 else ())  # odd turns: cut by length
        messages.append({"role": "assistant", "content": answer})


def test_documents_hold_about_1500_tokens_and_their_questions_share_them_as_a_prefix(tokenizer):
    import random

    sizes = [len(tokenizer.encode(document(n, random.Random(n), tokenizer)[0])) for n in range(1, 9)]
    assert all(1_400 <= size <= 1_500 for size in sizes), sizes
    requests = make_requests(WORKLOADS["document-qa"], 40, seed=0, tokenizer=tokenizer)
    documents = _sessions(requests)
    assert all(4 <= len(d) <= 6 for d in documents[:-1])
    assert [r.kind for r in documents[0]] == ["first-question"] + ["later-question"] * (len(documents[0]) - 1)
    for questions in documents:
        shared = min(_common_prefix(questions[0].prompt_ids, q.prompt_ids) for q in questions[1:] or questions)
        assert shared >= 1_400 and all(q.reply_close_ids is None for q in questions)
    across = max(_common_prefix(a[0].prompt_ids, b[0].prompt_ids) for a, b in itertools.pairwise(documents))
    assert across < 64  # two documents share the chat template's opening and the instruction, no more


class _FakeGateway:
    """Stands for pdserve.client.Client: a stream that takes a few milliseconds and replies with ids of its own;
    records every call."""

    def __init__(self, fail: set[str] = frozenset(), latency_s: float = 0.01) -> None:
        self.calls: dict[str, tuple[float, float, tuple[int, ...]]] = {}  # request id -> (start, end, prompt)
        self.fail, self.latency_s = fail, latency_s
        self.lock = threading.Lock()

    def stream(self, request, timeout_s, retries):
        start = time.monotonic()
        index = int(request.request_id.split("-")[1])
        if request.request_id in self.fail:
            raise _Unavailable()
        time.sleep(self.latency_s)
        ended = index % 2 == 0  # even requests end by EOS, odd ones by the length limit
        yield gateway_pb2.GenerateResponse(token_ids=[1000 + index, 2000 + index])
        yield gateway_pb2.GenerateResponse(
            token_ids=[EOS] if ended else [3000 + index],
            finish_reason=common_pb2.FINISH_REASON_STOP if ended else common_pb2.FINISH_REASON_LENGTH,
            usage=gateway_pb2.Usage(prompt_tokens=len(request.prompt_token_ids.ids), completion_tokens=3))
        with self.lock:  # the client has read the last message
            self.calls[request.request_id] = (start, time.monotonic(), tuple(request.prompt_token_ids.ids))


class _Unavailable(grpc.RpcError):
    def code(self):
        return grpc.StatusCode.UNAVAILABLE


@pytest.mark.parametrize("loop", ["closed", "poisson"])
def test_the_load_generator_sends_each_turn_after_the_one_before_with_its_reply_in_the_prompt(tokenizer, loop):
    requests = make_requests(WORKLOADS["multi-turn-chat"], 30, seed=2, tokenizer=tokenizer)
    gateway = _FakeGateway()
    started = time.monotonic()
    if loop == "closed":
        results = _closed_loop(gateway, requests, 3, started, started + 30, lambda _: None)
    else:
        results = _open_loop(gateway, requests, LoadSpec("poisson", 50.0, 30), started, started + 30, lambda _: None)
    assert sorted(r.index for r in results) == list(range(30)) and all(r.ok for r in results)
    by_index = {r.index: r for r in results}
    for conversation in _sessions(requests):
        for before, after in itertools.pairwise(conversation):
            _, ended, prompt = gateway.calls[f"bench-{before.index}"]
            began, _, next_prompt = gateway.calls[f"bench-{after.index}"]
            assert began >= ended  # turn k+1 only once turn k has ended
            reply = tuple(by_index[before.index].token_ids)
            assert next_prompt[:len(prompt)] == prompt  # the previous turn's prompt, exactly ...
            kept = reply[:-1] if reply[-1] == EOS else reply  # ... then its reply, ended once
            assert next_prompt[len(prompt):len(prompt) + len(kept) + 1] == (*kept, EOS)
            assert by_index[after.index].prompt_tokens == len(next_prompt)
    spans = sorted(gateway.calls.values())
    assert any(b[0] < a[1] for a, b in itertools.pairwise(spans))  # conversations do run side by side


def test_a_failed_turn_ends_its_conversation_and_the_others_go_on(tokenizer):
    requests = make_requests(WORKLOADS["multi-turn-chat"], 12, seed=0, tokenizer=tokenizer)
    first, second = _sessions(requests)[:2]
    gateway = _FakeGateway(fail={f"bench-{first[1].index}"})
    started = time.monotonic()
    results = _closed_loop(gateway, requests, 2, started, started + 30, lambda _: None)
    sent = {r.index for r in results}
    assert first[1].index in sent and not sent & {r.index for r in first[2:]}
    assert {r.index for r in second} <= sent
    assert [r.error for r in results if r.index == first[1].index] == ["UNAVAILABLE"]


class _Refused(grpc.RpcError):
    def code(self):
        return grpc.StatusCode.RESOURCE_EXHAUSTED

    def trailing_metadata(self):
        return (("grpc-retry-pushback-ms", "30"),)


class _FullGateway:
    """Refuses every request for room `refusals` times, then serves it."""

    def __init__(self, refusals: int) -> None:
        self.refusals = refusals
        self.attempts: list[float] = []

    def stream(self, request, timeout_s, retries):
        self.attempts.append(time.monotonic())
        if len(self.attempts) <= self.refusals:
            raise _Refused()
        yield gateway_pb2.GenerateResponse(token_ids=[5], finish_reason=common_pb2.FINISH_REASON_STOP)


def test_a_refusal_for_room_is_sent_again_after_the_asked_delay_only_when_asked():
    request = make_requests(WORKLOADS["smoke"], 1, seed=0)[0]
    started = time.monotonic()
    refused = _closed_loop(_FullGateway(2), [request], 1, started, started + 30, lambda _: None)
    assert [r.error for r in refused] == ["RESOURCE_EXHAUSTED"]
    gateway = _FullGateway(2)
    [served] = _closed_loop(gateway, [request], 1, started, started + 30, lambda _: None, retry_refused=True)
    assert served.ok and served.num_refused == 2
    assert all(b - a >= 0.03 for a, b in itertools.pairwise(gateway.attempts))  # the server's 30 ms, each time
    assert served.token_times_s[0] >= 0.06  # TTFT counts from the first attempt


def _result(index, cached, kv_bytes, path, prompt=100):
    return RequestResult(index, "later-turn", prompt, 64, 0.0, token_times_s=[0.1, 0.2], cached_tokens=cached,
                         kv_bytes=kv_bytes, prefill_path=path, finish_reason="FINISH_REASON_STOP")


def test_prefix_figures_are_means_per_completed_request_and_shares_of_each_prefill_path():
    results = [_result(0, 0, 8000, "prefill-tier"), _result(1, 96, 0, "decode-local"),
               _result(2, 64, 2000, "prefill-tier"), _result(3, 32, 0, "decode-local")]
    prefix = prefix_reuse(results)
    assert prefix == {"mean_cached_tokens": 48.0, "cached_share_of_prompt": 0.48, "mean_kv_bytes": 2500,
                      "prefill_paths": {"decode-local": 0.5, "prefill-tier": 0.5}}
    assert prefix_reuse([RequestResult(0, "chat", 10, 8, 0.0, token_times_s=[0.1])]) is None  # no such fields


def test_decode_kv_counts_preemptions_and_prefix_hits_during_the_run():
    samples = [StatsSample(0.0, 0, 100, 100, 100.0, 9, 5, 0, 10, 1000, 400, 2),
               StatsSample(0.5, 12, 150, 700, 700.0, 14, 8, 3, 30, 3000, 1900, 6),
               StatsSample(1.0, 4, 200, 900, 900.0, 14, 9, 1, 40, 5000, 3400, 9)]
    assert decode_kv(samples) == {"num_preemptions": 4, "max_preempted_waiting": 3, "max_batch_size_since_start": 14,
                                  "num_cached_blocks_end": 40, "prefix_hit_rate": 0.75, "num_local_prefills": 7}


def test_the_report_shows_prefix_reuse_and_the_decode_pool_per_run():
    run = {"name": "pdserve-upfront", "workload": "long-budget", "load": "closed, 32 clients",
           "output_tokens_per_s": 812.5, "ttft_ms": {"p50": 41.0, "p95": 180.0},
           "prefix": prefix_reuse([_result(0, 0, 8000, "prefill-tier"), _result(1, 96, 0, "decode-local")]),
           "decode_batch": {"max_running": 9, "mean_per_step": 7.25},
           "decode_kv": {"num_preemptions": 0, "max_preempted_waiting": 0, "max_batch_size_since_start": 10},
           "num_refused_retried": 12, "answer_tokens": {"tokens": {"p50": 97.0, "mean": 101.2},
                             "finish_reasons": {"FINISH_REASON_STOP": 3, "FINISH_REASON_LENGTH": 1}}}
    table = report.kv_table([run])
    assert ("| pdserve-upfront | long-budget | closed, 32 clients | 812.5 | 41 / 180 | 48 (48%) | 0.00 MB "
            "| decode-local 50%, prefill-tier 50% | 9 / 10 / 7.2 | 0 (0) | 12 | 97 / 101, 75% by EOS |") in table
    assert report.kv_table([{"name": "hf-static"}]) == ""


def _parsed_up(command: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_up_arguments(parser, Path("model"))
    return parser.parse_args(command[command.index("up") + 1:])


def test_the_issue_16_peers_start_pdserve_up_with_their_flags_and_the_shared_kv_pool():
    options = PeerOptions(model_dir=Path("model"), log_dir=Path("logs"), kv_blocks=384)
    ports = {"gateway": 1, "prefill": 2, "decode": 3}
    base = _parsed_up(stack_command(options, ports, colocated=False))
    assert base.kv_blocks == 384 and base.prefix_caching and base.kv_growth == "lazy"
    assert not _parsed_up(stack_command(options, ports, False, NO_PREFIX_CACHE_FLAGS)).prefix_caching
    assert _parsed_up(stack_command(options, ports, False, UPFRONT_FLAGS)).kv_growth == "upfront"
    assert _parsed_up(stack_command(options, ports, False, NO_LOCAL_PREFILL_FLAGS)).local_prefill_tokens == 0
    default_pool = PeerOptions(model_dir=Path("model"), log_dir=Path("logs"))
    assert "--kv-blocks" not in stack_command(default_pool, ports, colocated=False)


def test_a_max_new_tokens_override_replaces_every_requests_budget(model_dir):
    requests = workload_requests([WORKLOADS["document-qa"], WORKLOADS["long-budget"]], 6, 0, model_dir, 128)
    assert {r.max_new_tokens for reqs in requests.values() for r in reqs} == {128}
    budgets = workload_requests([WORKLOADS["long-budget"]], 6, 0, model_dir)["long-budget"]
    assert {r.max_new_tokens for r in budgets} == {512}
