"""The harness's speculation comparison, without servers: the text workloads, reading the responses'
`speculation` field, the run figures and the off-vs-on table, and the pdserve-spec peer's command line."""

import argparse
import random
from pathlib import Path

import pytest

from pdserve.bench import peers, report
from pdserve.bench.cli import _workload_list
from pdserve.bench.loadgen import RequestResult, _to_proto, send_one
from pdserve.bench.metrics import Slo, speculation, summarize
from pdserve.bench.peer_process import PeerOptions
from pdserve.bench.runner import _logged_step_costs, speculation_comparison
from pdserve.bench.workloads import (
    OPEN_CHAT_PROMPTS,
    PASSAGES,
    WORKLOADS,
    BenchRequest,
    make_requests,
    with_typos,
)
from pdserve.cli import build_parser
from pdserve.v1 import common_pb2, gateway_pb2

EXTRACTIVE_KINDS = {"repeat", "quote", "replace", "fix-typos", "question"}


def test_extractive_requests_are_real_text_built_on_a_passage_and_reproducible():
    requests = make_requests(WORKLOADS["extractive"], 20, seed=3)
    assert requests == make_requests(WORKLOADS["extractive"], 20, seed=3)
    assert requests != make_requests(WORKLOADS["extractive"], 20, seed=4)
    assert {r.kind for r in requests} == EXTRACTIVE_KINDS
    for r in requests:
        assert r.prompt_ids == () and 64 <= r.max_new_tokens <= 128
        passage = next(p for p in PASSAGES if p.text in r.text or p.title in r.text)
        if r.kind != "fix-typos":
            assert passage.text in r.text  # the whole passage is in the prompt, for prompt lookup to find
        assert len(r.text) > len(passage.text) * 0.9


def test_passages_are_a_few_hundred_words_and_their_edits_point_at_their_own_text():
    assert len(PASSAGES) >= 4 and len({p.title for p in PASSAGES}) == len(PASSAGES)
    for p in PASSAGES:
        assert 150 <= len(p.text.split()) <= 250, p.title
        for old, new in p.replacements:
            assert old in p.text and new not in p.text, (p.title, old)
        assert p.quotes and p.questions


def test_replace_and_quote_instructions_name_what_is_in_the_passage():
    for r in make_requests(WORKLOADS["extractive"], 30, seed=0):
        passage = next(p for p in PASSAGES if p.title in r.text)
        if r.kind == "replace":
            assert any(f'"{old}" with "{new}"' in r.text for old, new in passage.replacements)
        if r.kind == "quote":
            assert any(f"the sentence about {q} " in r.text for q in passage.quotes)


def test_typos_swap_adjacent_letters_in_exactly_the_words_asked():
    text = PASSAGES[0].text
    typoed = with_typos(text, random.Random(5), 4)
    assert typoed == with_typos(text, random.Random(5), 4)
    changed = [(a, b) for a, b in zip(text.split(" "), typoed.split(" ")) if a != b]
    assert len(changed) == 4
    for original, misspelt in changed:
        diff = [i for i, (x, y) in enumerate(zip(original, misspelt)) if x != y]
        assert len(diff) == 2 and diff[1] == diff[0] + 1 and sorted(original) == sorted(misspelt)


def test_open_chat_asks_questions_whose_answers_are_not_in_the_prompt():
    requests = make_requests(WORKLOADS["open-chat"], 12, seed=0)
    assert all(r.text in OPEN_CHAT_PROMPTS and r.prompt_ids == () for r in requests)
    assert len({r.text for r in requests}) > 6
    assert not any(p.text[:40] in r.text for r in requests for p in PASSAGES)


def test_text_requests_go_out_as_one_user_turn_and_id_requests_as_ids():
    text = _to_proto(BenchRequest(0, "repeat", (), 64, text="Repeat this."))
    assert text.WhichOneof("input") == "messages"
    assert [(m.role, m.content) for m in text.messages.messages] == [("user", "Repeat this.")]
    ids = _to_proto(BenchRequest(1, "chat", (5, 6, 7), 8))
    assert ids.WhichOneof("input") == "prompt_token_ids" and list(ids.prompt_token_ids.ids) == [5, 6, 7]
    assert text.sampling.temperature == 0.0 and not text.HasField("speculative")  # the deployment decides


class _FakeStub:
    """Stands for pdserve.client.Client: its stream of raw replies."""

    def __init__(self, replies):
        self.replies = replies

    def stream(self, request, timeout_s, retries):
        return iter(self.replies)


def test_send_one_reads_speculation_and_the_prompt_length_from_the_last_response():
    last = gateway_pb2.GenerateResponse(
        token_ids=[4], finish_reason=common_pb2.FINISH_REASON_LENGTH,
        usage=gateway_pb2.Usage(prompt_tokens=321, completion_tokens=4),
        speculation=gateway_pb2.Speculation(num_proposed=10, num_accepted=7, acceptance_rate=0.7,
                                            tokens_per_verify_step=2.5))
    replies = [gateway_pb2.GenerateResponse(token_ids=[1]), gateway_pb2.GenerateResponse(token_ids=[2, 3]), last]
    result = send_one(_FakeStub(replies), BenchRequest(0, "repeat", (), 4, text="t"), 0.0, float("inf"))
    assert result.num_tokens == 4 and result.prompt_tokens == 321
    assert result.speculated and (result.spec_proposed, result.spec_accepted) == (10, 7)
    assert result.spec_acceptance_rate == 0.7 and result.spec_tokens_per_verify_step == 2.5
    plain = send_one(_FakeStub(replies[:2] + [gateway_pb2.GenerateResponse(finish_reason=1)]),
                     BenchRequest(1, "chat", (9, 9), 4), 0.0, float("inf"))
    assert not plain.speculated and plain.prompt_tokens == 2


def _spec_result(index, proposed, accepted, per_step, error=""):
    return RequestResult(index, "repeat", 100, 64, 0.0, token_times_s=[] if error else [0.1, 0.2], error=error,
                         speculated=True, spec_proposed=proposed, spec_accepted=accepted,
                         spec_acceptance_rate=accepted / proposed, spec_tokens_per_verify_step=per_step)


def test_decode_time_per_token_weighs_requests_by_their_tokens():
    results = [RequestResult(0, "a", 1, 8, 0.0, token_times_s=[0.1, 0.2, 0.3, 0.4, 0.5]),  # 4 tokens in 400 ms
               RequestResult(1, "a", 1, 8, 0.0, token_times_s=[0.1, 0.3]),  # 1 token in 200 ms
               RequestResult(2, "a", 1, 8, 0.0, token_times_s=[0.1]), RequestResult(3, "a", 1, 8, 0.0, error="X")]
    s = summarize(results, 1.0, Slo(1000, 1000))
    assert s["decode_ms_per_token"] == pytest.approx(600 / 5)  # where TPOT's p50 is 150 ms
    assert s["tpot_ms"]["p50"] == pytest.approx(150.0)


def test_run_acceptance_is_over_all_proposals_not_a_mean_of_rates():
    results = [_spec_result(0, 100, 90, 4.0), _spec_result(1, 10, 1, 1.2), _spec_result(2, 50, 50, 5.0, error="X"),
               RequestResult(3, "repeat", 100, 64, 0.0, token_times_s=[0.1, 0.2])]
    spec = speculation(results)
    assert spec["num_requests"] == 2 and (spec["num_proposed"], spec["num_accepted"]) == (110, 91)
    assert spec["acceptance_rate"] == pytest.approx(91 / 110, abs=1e-4)  # the mean of rates would be 0.5
    assert spec["tokens_per_verify_step"]["mean"] == pytest.approx(2.6)
    assert speculation(results[3:]) is None
    assert "speculation" not in summarize(results[3:], 1.0, Slo(1000, 1000))
    assert summarize(results, 1.0, Slo(1000, 1000))["speculation"] == spec


def _run(name, workload, load, tpot_p50, tpot_p99, tokens_per_s, spec=None, per_token=None):
    return {"name": name, "workload": workload, "load": load, "output_tokens_per_s": tokens_per_s,
            "tpot_ms": {"p50": tpot_p50, "p90": tpot_p99, "p99": tpot_p99}, "decode_ms_per_token": per_token,
            **({"speculation": spec} if spec else {})}


def test_comparison_pairs_each_speculating_run_with_its_baseline_on_the_same_workload_and_load():
    spec = {"acceptance_rate": 0.9, "tokens_per_verify_step": {"mean": 4.2, "p50": 4.5}, "num_requests": 3,
            "num_proposed": 10, "num_accepted": 9}
    runs = [_run("pdserve", "extractive", "closed, 1 client", 60.0, 80.0, 15.0, per_token=63.0),
            _run("pdserve", "open-chat", "closed, 1 client", 55.0, 70.0, 16.0),
            _run("pdserve-spec", "extractive", "closed, 1 client", 24.0, 40.0, 33.0, spec, per_token=30.0),
            _run("pdserve-spec", "open-chat", "closed, 4 clients", 50.0, 60.0, 30.0)]  # no baseline at 4 clients
    rows = speculation_comparison(runs)
    assert len(rows) == 1
    row = rows[0]
    assert (row["workload"], row["off"], row["on"]) == ("extractive", "pdserve", "pdserve-spec")
    assert row["tpot_speedup_p50"] == 2.5 and row["tpot_speedup_p99"] == 2.0 and row["throughput_ratio"] == 2.2
    assert row["decode_speedup_token_weighted"] == 2.1
    table = report.speculation_table(rows)
    assert "| extractive | closed, 1 client | pdserve / pdserve-spec | 60 / 24 | 2.50x | 80 / 40 | 2.00x " \
           "| 63 / 30 | 2.10x | 15.0 / 33.0 | 0.90 | 4.20 |" in table


def test_runs_table_shows_acceptance_only_where_a_run_speculated():
    base = summarize([RequestResult(0, "repeat", 10, 8, 0.0, token_times_s=[0.1, 0.2])], 1.0, Slo(1000, 1000))
    spec = summarize([_spec_result(0, 20, 15, 3.5)], 1.0, Slo(1000, 1000))
    runs = [{"name": n, "workload": "extractive", "load": "closed, 1 client", **s, "decode_batch": None,
             "kv_transfer": None} for n, s in (("off", base), ("on", spec))]
    lines = report.runs_table(runs).splitlines()
    assert lines[2].endswith("| - | - | - |") and "| 0.75 | 3.50 |" in lines[3]


def test_verify_cost_lines_quote_the_measurement_and_the_peer_log(tmp_path):
    log = tmp_path / "pdserve-spec.log"
    log.write_text("pdserve decode serving\n"
                   "INFO decode step cost verifying k = 0..2 drafts: 1.00, 1.40, 1.90 plain steps\n")
    line = _logged_step_costs(log)
    assert line.endswith("1.00, 1.40, 1.90 plain steps")
    assert _logged_step_costs(tmp_path / "absent.log") is None
    summary = {"verify_step_costs": {"threads": 1, "relative_cost": [1.0, 1.4, 1.9], "series": [[1, 1.4, 1.9]],
                                     "logged_by_peer": {"pdserve-spec": line, "other": None}}}
    text = "\n".join(report.verify_cost_lines(summary))
    assert "k=0 1.00, k=1 1.40, k=2 1.90" in text and line in text and "other's log holds no step-cost line" in text


def test_the_spec_peer_is_the_pdserve_peer_plus_prompt_lookup(monkeypatch, tmp_path):
    commands = {}
    monkeypatch.setattr(peers, "free_port", lambda host: 4321)
    monkeypatch.setattr(peers, "launch", lambda name, command, *rest: commands.setdefault(name, command))
    options = PeerOptions(model_dir=tmp_path, log_dir=tmp_path, prefill_cpus=frozenset({0}),
                          decode_cpus=frozenset({1}))
    peers.PEERS["pdserve"](options)
    peers.PEERS["pdserve-spec"](options)
    off, on = commands["pdserve"], commands["pdserve-spec"]
    assert on == off + ["--speculative", "prompt-lookup"]
    assert "--prefill-cpus" in off and "--decode-cpus" in off
    up = build_parser(tmp_path).parse_args(on[on.index("up"):])  # the real `pdserve up` accepts it
    assert up.speculative == "prompt-lookup" and up.max_batch_size == 32


def test_workload_lists_parse_and_refuse_unknown_or_repeated_names():
    assert _workload_list("extractive,open-chat") == ["extractive", "open-chat"]
    assert build_parser(Path(".")).parse_args(
        ["bench", "--address", "a:1", "--workload", "extractive,open-chat"]).workload == ["extractive", "open-chat"]
    for bad in ("extractive,extractive", "nope", ","):
        with pytest.raises(argparse.ArgumentTypeError):
            _workload_list(bad)


def test_the_draft_peer_is_the_pdserve_peer_plus_its_draft_and_is_compared_with_both(monkeypatch, tmp_path):
    commands = {}
    monkeypatch.setattr(peers, "free_port", lambda host: 4321)
    monkeypatch.setattr(peers, "launch", lambda name, command, *rest: commands.setdefault(name, command))
    (tmp_path / "draft").mkdir()
    options = PeerOptions(model_dir=tmp_path, log_dir=tmp_path, draft_model=tmp_path / "draft")
    with pytest.raises(peers.PeerUnavailable, match="pdserve distill-draft"):
        peers.PEERS["pdserve-draft"](options)  # no checkpoint there yet
    (tmp_path / "draft" / "config.json").write_text("{}")
    peers.PEERS["pdserve"](options)
    peers.PEERS["pdserve-draft"](options)
    assert commands["pdserve-draft"] == commands["pdserve"] + ["--speculative", "draft", "--draft-model",
                                                               str(tmp_path / "draft")]
    up = build_parser(tmp_path).parse_args(commands["pdserve-draft"][commands["pdserve-draft"].index("up"):])
    assert up.speculative == "draft" and up.draft_model == tmp_path / "draft" and not up.speculative_fixed_k
    runs = [_run(name, "open-chat", "closed, 1 client", tpot, tpot, 1000 / tpot)
            for name, tpot in (("pdserve", 50.0), ("pdserve-spec", 40.0), ("pdserve-draft", 25.0))]
    rows = {(r["off"], r["on"]): r["tpot_speedup_p50"] for r in speculation_comparison(runs)}
    assert rows == {("pdserve", "pdserve-spec"): 1.25, ("pdserve", "pdserve-draft"): 2.0,
                    ("pdserve-spec", "pdserve-draft"): 1.6}


def test_the_fp16_peer_and_pdserve_weights_set_both_tiers_of_the_stack(monkeypatch, tmp_path):
    commands = {}
    monkeypatch.setattr(peers, "free_port", lambda host: 4321)
    monkeypatch.setattr(peers, "launch", lambda name, command, *rest: commands.setdefault(name, command))
    for name in ("pdserve", "pdserve-fp16", "pdserve-colocated"):
        peers.PEERS[name](PeerOptions(model_dir=tmp_path, log_dir=tmp_path))
    parsed = {name: build_parser(tmp_path).parse_args(command[command.index("up"):] if "up" in command else command)
              for name, command in commands.items()}
    assert [(parsed[n].prefill_weights, parsed[n].decode_weights) for n in ("pdserve", "pdserve-fp16")] == [
        ("fp32", "fp32"), ("fp16", "fp16")]
    commands.clear()
    peers.PEERS["pdserve-colocated"](PeerOptions(model_dir=tmp_path, log_dir=tmp_path, weights="fp16"))
    up = build_parser(tmp_path).parse_args(commands["pdserve-colocated"][commands["pdserve-colocated"].index("up"):])
    assert up.colocated and (up.prefill_weights, up.decode_weights) == ("fp16", "fp16")
    bench = build_parser(tmp_path).parse_args(["bench", "--peers", "pdserve-fp16", "--pdserve-weights", "int8"])
    assert bench.peers == ["pdserve-fp16"] and bench.pdserve_weights == "int8"
