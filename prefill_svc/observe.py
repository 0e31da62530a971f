"""How one finished prefill is recorded: phase spans under the request's `prefill` span, built after the
fact from the times the engine and the KV sender noted (the engine thread never touches tracing), and
the tier's metrics."""

from opentelemetry.trace import Span

from common.edge.metrics import PrefillMetrics
from common.edge.tracing import WallClock, record_phase
from common.kv.transport import KvAck, KvSender
from prefill_svc.engine import PrefillJob

_TRACER = "pdserve.prefill"


def record_prefill(span: Span, metrics: PrefillMetrics, job: PrefillJob, sender: KvSender, ack: KvAck,
                   acked_at: float) -> None:
    clock = WallClock()
    record_phase("prefill.queue", span, job.enqueued_at, job.started_at, clock, tracer_name=_TRACER)
    _record_chunks(span, job, sender, clock)
    span.set_attributes({"pdserve.prefill.chunks": job.num_chunks, "pdserve.kv.bytes": ack.num_bytes,
                         "pdserve.kv.pages": ack.num_chunks, "gen_ai.usage.input_tokens": len(job.token_ids),
                         "pdserve.prefix.cached_tokens": job.num_cached, "pdserve.kv.skipped_tokens": job.kv_skip})
    metrics.queue_time.observe(job.started_at - job.enqueued_at)
    metrics.compute_time.observe(job.computed_at - job.started_at)
    metrics.prompt_tokens.inc(len(job.token_ids))
    metrics.chunks.inc(job.num_chunks)
    metrics.kv_transfer_bytes.inc(ack.num_bytes)
    metrics.kv_transfer_pages.inc(ack.num_chunks)
    if sender.log.first_sent_at is not None:
        metrics.kv_transfer_time.observe(acked_at - sender.log.first_sent_at)


def _record_chunks(span: Span, job: PrefillJob, sender: KvSender, clock: WallClock) -> None:
    """One `prefill.compute` span per chunk. A chunk's step began when the previous chunk's last page was
    handed over (the first at the job's first step); the last chunk ends when its first token was drawn."""
    timings = sorted(sender.log.chunks.values(), key=lambda t: t.token_start)
    start_s = job.started_at
    for index, timing in enumerate(timings):
        end_s = job.computed_at if index == len(timings) - 1 else timing.last_s
        record_phase("prefill.compute", span, start_s, end_s, clock, tracer_name=_TRACER,
                     attributes={"pdserve.prefill.chunk": index, "pdserve.prefill.token_start": timing.token_start,
                                 "pdserve.prefill.num_tokens": timing.num_tokens})
        start_s = timing.last_s
