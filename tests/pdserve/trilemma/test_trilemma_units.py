"""The trilemma's pure parts: configuration specs, the Pareto front, greedy-answer matching."""

import pytest

from pdserve.trilemma.report import dominates, mark_pareto, table
from pdserve.trilemma.sweep import REFERENCE, ServeConfig, greedy_match


def test_spec_parses_every_key_and_keeps_defaults():
    config = ServeConfig.parse("prefill=int8, decode=int4-awq-g128,kv=float16,spec=prompt-lookup")
    assert config == ServeConfig("int8", "int4-awq-g128", "float16", "prompt-lookup")
    assert ServeConfig.parse("decode=int8") == ServeConfig(decode_weights="int8")
    assert ServeConfig.parse("") == REFERENCE
    assert config.flags() == ("--prefill-weights", "int8", "--decode-weights", "int4-awq-g128", "--kv-dtype",
                              "float16", "--speculative", "prompt-lookup")
    assert config.flags(fixed_k=True)[-1] == "--speculative-fixed-k"
    assert "--speculative-fixed-k" not in REFERENCE.flags(fixed_k=True)  # nothing to fix without speculation


@pytest.mark.parametrize("spec, message", [("decode=int3", "decode='int3' is not one of"),
                                           ("weights=int8", "key one of prefill, decode, kv, spec"),
                                           ("kv=", "key one of"), ("spec=medusa", "spec='medusa'")])
def test_bad_spec_says_what_is_allowed(spec, message):
    with pytest.raises(ValueError, match=message):
        ServeConfig.parse(spec)


def _row(tpot, tok_s, weight_bytes, match, error=""):
    return {"label": f"{tpot}/{tok_s}/{weight_bytes}/{match}", "error": error,
            "latency": {"tpot_ms": {"p50": tpot, "p99": tpot}, "ttft_ms": {"p50": 1, "p99": 1}},
            "cost": {"output_tokens_per_s": tok_s, "decode_weight_bytes": weight_bytes, "kv_bytes_per_token": 10},
            "fidelity": {"greedy_prefix_match": match}}


def test_pareto_front_keeps_every_tradeoff_and_drops_the_dominated():
    reference = _row(50, 20, 500, 1.0)
    small = _row(40, 25, 100, 0.8)  # cheaper and faster, less faithful: a trade-off, on the front
    worse_small = _row(45, 22, 100, 0.7)  # no better than `small` anywhere
    failed = _row(1, 1000, 1, 1.0, error="did not start")
    rows = [reference, small, worse_small, failed]
    mark_pareto(rows)
    assert [r["pareto"] for r in rows] == [True, True, False, False]
    assert dominates(small, worse_small) and not dominates(reference, small) and not dominates(small, reference)
    assert not dominates(reference, reference)  # equal everywhere: neither dominates
    assert "failed: did not start" in table(rows)


def test_greedy_match_counts_tokens_up_to_the_first_difference():
    reference = [[1, 2, 3, 4], [5, 6], [7, 8, 9, 10]]
    ours = [[1, 2, 3, 4], [5, 0], [7, 8, 9]]  # identical; differs at 1 of 2; stopped early after 3 of 4
    match = greedy_match(ours, reference)
    assert match["greedy_identical"] == round(1 / 3, 4)
    assert match["greedy_prefix_match"] == round((1 + 0.5 + 0.75) / 3, 4)
    assert match["greedy_tokens"] == 4 + 2 + 3
