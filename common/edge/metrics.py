"""Prometheus metrics of each tier. One CollectorRegistry per server, passed down explicitly (two servers
in one test process never share series). The request-latency histograms carry the OpenTelemetry GenAI
names and bucket boundaries, in Prometheus form: `gen_ai.server.time_to_first_token` (unit s) is
`gen_ai_server_time_to_first_token_seconds`. Gauges that describe an engine's state (queue depth, batch
size, KV blocks) are read from its stats() at scrape time, so the engines need not know about metrics."""

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

# OpenTelemetry GenAI semantic conventions: the ExplicitBucketBoundaries of each server metric.
TTFT_BUCKETS_S = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)
TPOT_BUCKETS_S = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)
REQUEST_DURATION_BUCKETS_S = (0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96,
                              81.92)
# Phases inside a tier: from sub-millisecond queue waits to prefills of long prompts on CPU.
PHASE_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
# Tokens one sequence gains per decode step: 1 without speculation, up to k + 1 with k drafted tokens.
TOKENS_PER_STEP_BUCKETS = (1.0, 1.25, 1.5, 1.75, 2.0, 2.5, 3.0, 4.0, 5.0, 6.0, 8.0)

GENAI_LABELS = ("gen_ai_operation_name", "gen_ai_request_model")


class GatewayMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.time_to_first_token = Histogram(
            "gen_ai_server_time_to_first_token_seconds",
            "Time to generate the first token (gen_ai.server.time_to_first_token)",
            GENAI_LABELS, buckets=TTFT_BUCKETS_S, registry=registry)
        self.time_per_output_token = Histogram(
            "gen_ai_server_time_per_output_token_seconds",
            "Time per output token after the first, per successful request (gen_ai.server.time_per_output_token)",
            GENAI_LABELS, buckets=TPOT_BUCKETS_S, registry=registry)
        self.request_duration = Histogram(
            "gen_ai_server_request_duration_seconds",
            "Request duration to the last token or error (gen_ai.server.request.duration)",
            GENAI_LABELS, buckets=REQUEST_DURATION_BUCKETS_S, registry=registry)
        self.requests = Counter("pdserve_gateway_requests", "Generate requests by finish reason and gRPC status code",
                                ("finish_reason", "code"), registry=registry)
        self.tokens = Counter("pdserve_gateway_tokens", "Prompt (input) and generated (output) tokens",
                              ("gen_ai_token_type",), registry=registry)
        self.in_flight = Gauge("pdserve_gateway_requests_in_flight", "Generate requests being served",
                               registry=registry)


class PrefillMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.queue_time = Histogram("pdserve_prefill_queue_seconds", "Arrival to the first prefill step",
                                    buckets=PHASE_BUCKETS_S, registry=registry)
        self.compute_time = Histogram("pdserve_prefill_compute_seconds", "First prefill step to the first token",
                                      buckets=PHASE_BUCKETS_S, registry=registry)
        self.prompt_tokens = Counter("pdserve_prefill_prompt_tokens", "Prompt tokens prefilled", registry=registry)
        self.chunks = Counter("pdserve_prefill_chunks", "Prompt chunks computed (chunked prefill)", registry=registry)
        self.kv_transfer_bytes = Counter("pdserve_kv_transfer_bytes", "KV bytes pushed to decode instances",
                                         registry=registry)
        self.kv_transfer_pages = Counter("pdserve_kv_transfer_pages", "KV pages (one layer, one token range) pushed",
                                         registry=registry)
        self.kv_transfer_time = Histogram("pdserve_kv_transfer_seconds",
                                          "First KV page sent to the decode instance's acknowledgement",
                                          buckets=PHASE_BUCKETS_S, registry=registry)
        self.requests = Counter("pdserve_prefill_requests", "Prefill requests by gRPC status code", ("code",),
                                registry=registry)


class DecodeMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.queue_time = Histogram("pdserve_decode_queue_seconds",
                                    "Decode call to admission into the running batch (waiting for KV and a slot)",
                                    buckets=PHASE_BUCKETS_S, registry=registry)
        self.waiting = Gauge("pdserve_decode_waiting", "Sequences waiting for their KV or a batch slot",
                             registry=registry)
        self.tokens_per_step = Histogram(
            "pdserve_decode_tokens_per_step",
            "Tokens a sequence gained per decode step it took part in (speculative acceptance; 1 without it)",
            buckets=TOKENS_PER_STEP_BUCKETS, registry=registry)
        self.kv_received_bytes = Counter("pdserve_kv_received_bytes", "KV bytes received from prefill instances",
                                         registry=registry)
        self.requests = Counter("pdserve_decode_requests", "Decode streams by finish reason", ("finish_reason",),
                                registry=registry)


# stats() field -> (metric name, help, kind). Only fields the snapshot has are exported.
StatsFields = dict[str, tuple[str, str, str]]
# Both model tiers' KV pool and prefix cache (labelled by tier).
KV_POOL_STATS: StatsFields = {
    "num_blocks_free": ("pdserve_kv_blocks_free", "Free KV blocks of this instance's pool", "gauge"),
    "num_blocks_total": ("pdserve_kv_blocks_total", "KV blocks of this instance's pool", "gauge"),
    "num_cached_blocks": ("pdserve_prefix_cache_blocks", "Full KV blocks held in the prefix cache (in use or "
                          "evictable)", "gauge"),
    "num_prefix_query_tokens": ("pdserve_prefix_cache_query_tokens", "Prompt tokens looked up in the prefix cache",
                                "counter"),
    "num_prefix_hit_tokens": ("pdserve_prefix_cache_hit_tokens", "Prompt tokens found in the prefix cache",
                              "counter"),
}
PREFILL_STATS: StatsFields = {
    "num_queued": ("pdserve_prefill_queue_depth", "Prompts queued or computing", "gauge"),
    "num_queued_tokens": ("pdserve_prefill_queued_tokens", "Prompt tokens not yet computed", "gauge"),
    "num_steps": ("pdserve_prefill_steps", "Prefill steps run", "counter"),
    **KV_POOL_STATS,
}
DECODE_STATS: StatsFields = {
    "num_running": ("pdserve_decode_batch_size", "Sequences in the running decode batch", "gauge"),
    "num_reserved": ("pdserve_decode_reserved", "Reservations whose decoding has not started", "gauge"),
    "num_steps": ("pdserve_decode_steps", "Decode steps run", "counter"),
    "num_tokens_generated": ("pdserve_decode_tokens", "Tokens generated by decode steps", "counter"),
    "num_leases_expired": ("pdserve_decode_leases_expired", "Reservations freed by their lease", "counter"),
    "num_cancelled": ("pdserve_decode_cancelled", "Sequences cancelled", "counter"),
    "num_spec_proposed": ("pdserve_decode_spec_proposed_tokens", "Draft tokens proposed (speculative decoding)",
                          "counter"),
    "num_spec_accepted": ("pdserve_decode_spec_accepted_tokens", "Draft tokens the target model accepted",
                          "counter"),
    **KV_POOL_STATS,
    "num_preemptions": ("pdserve_decode_preemptions", "Sequences preempted when the KV pool ran out (their KV "
                        "recomputed when admitted again)", "counter"),
    "num_preempted_waiting": ("pdserve_decode_preempted_waiting", "Preempted sequences waiting for room", "gauge"),
    "num_fenced_blocks": ("pdserve_decode_kv_fenced_blocks", "Blocks of ended reservations held until their NIXL "
                          "writer stops", "gauge"),
    "num_local_prefills": ("pdserve_decode_local_prefills", "Requests this decode instance prefilled itself "
                           "(conditional disaggregation)", "counter"),
}


class StatsCollector(Collector):
    """Exports an engine's stats() snapshot at scrape time, plus KV blocks used (total - free)."""

    def __init__(self, stats: Callable[[], Any], fields: StatsFields, tier: str) -> None:
        self._stats = stats
        self._fields = fields
        self._tier = tier

    def collect(self) -> Iterator[Metric]:
        snapshot = vars(self._stats())
        for field, (name, documentation, kind) in self._fields.items():
            if field not in snapshot:
                continue
            family = (CounterMetricFamily if kind == "counter" else GaugeMetricFamily)(name, documentation,
                                                                                       labels=["tier"])
            family.add_metric([self._tier], float(snapshot[field]))
            yield family
        if {"num_blocks_total", "num_blocks_free"} <= snapshot.keys():
            used = GaugeMetricFamily("pdserve_kv_blocks_used", "KV blocks in use or reserved", labels=["tier"])
            used.add_metric([self._tier], float(snapshot["num_blocks_total"] - snapshot["num_blocks_free"]))
            yield used
        if snapshot.get("num_prefix_query_tokens"):
            rate = GaugeMetricFamily("pdserve_prefix_cache_hit_rate", "Share of looked-up prompt tokens found in the "
                                     "prefix cache since start", labels=["tier"])
            rate.add_metric([self._tier], snapshot["num_prefix_hit_tokens"] / snapshot["num_prefix_query_tokens"])
            yield rate
        if snapshot.get("expert_load"):  # mixture-of-experts models: (layers, experts) tokens routed
            yield self._expert_tokens(snapshot["expert_load"])

    def _expert_tokens(self, expert_load: list[list[int]]) -> Metric:
        family = CounterMetricFamily("pdserve_moe_expert_tokens", "Tokens each MoE layer routed to each expert",
                                     labels=["tier", "layer", "expert"])
        for layer, counts in enumerate(expert_load):
            for expert, count in enumerate(counts):
                family.add_metric([self._tier, str(layer), str(expert)], float(count))
        return family
