"""Expert load leaves the decode tier two ways: the Stats RPC (one ExpertLoad per layer, none for a dense
model) and the Prometheus counter pdserve_moe_expert_tokens (one series per layer and expert)."""

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from common.edge.metrics import DECODE_STATS, StatsCollector
from decode_svc.convert import stats_to_proto
from decode_svc.sequence import DecodeStatsSnapshot


def _snapshot(expert_load: list[list[int]]) -> DecodeStatsSnapshot:
    return DecodeStatsSnapshot(num_blocks_total=8, num_blocks_free=6, num_reserved=0, num_running=1, num_steps=5,
                               num_tokens_generated=5, max_batch_size=1, mean_batch_size=1.0,
                               num_leases_expired=0, num_cancelled=0, block_size=16, num_spec_proposed=0,
                               num_spec_accepted=0, expert_load=expert_load)


def test_stats_carry_each_layers_tokens_per_expert():
    reply = stats_to_proto(_snapshot([[3, 0, 5, 2], [1, 4, 4, 1]]))
    assert [(load.layer, list(load.tokens_per_expert)) for load in reply.expert_load] == [
        (0, [3, 0, 5, 2]), (1, [1, 4, 4, 1])]
    assert reply.num_tokens_generated == 5 and reply.block_size == 16
    assert len(stats_to_proto(_snapshot([])).expert_load) == 0  # dense model


def test_expert_load_is_exported_per_layer_and_expert():
    registry = CollectorRegistry()
    registry.register(StatsCollector(lambda: _snapshot([[3, 0], [1, 2]]), DECODE_STATS, tier="decode"))
    samples = {(s.labels["layer"], s.labels["expert"]): s.value
               for family in text_string_to_metric_families(generate_latest(registry).decode())
               if family.name == "pdserve_moe_expert_tokens" for s in family.samples if s.name.endswith("_total")}
    assert samples == {("0", "0"): 3, ("0", "1"): 0, ("1", "0"): 1, ("1", "1"): 2}

    dense = CollectorRegistry()
    dense.register(StatsCollector(lambda: _snapshot([]), DECODE_STATS, tier="decode"))
    assert b"pdserve_moe_expert_tokens" not in generate_latest(dense)
