"""The gateway's `Tiers` (gateway/tiers.py) over real engines in this process: prefill engines push KV into
decode engines through the in-process KV transport (common/kv/transport.py). No processes, no sockets: the
gateway's Generation, and the engines under it, tested on their own."""

from contextlib import contextmanager
from dataclasses import dataclass

import torch

from common.basics.config import DecodeConfig
from common.basics.errors import Cancelled, PdserveError, Unavailable, Upstream
from common.basics.sampling import SamplingConfig
from common.basics.tokenizer import TextTokenizer
from common.edge.errors import status_of
from common.kv.block_manager import BlockManager
from common.kv.pool import KvPool
from common.kv.prefix import root_hash
from common.kv.transport import InProcessKvSender
from common.model.runner import ModelRunner
from decode_svc.engine import FINISH_SHUTDOWN, DecodeEngine
from decode_svc.scheduler import Scheduler
from gateway.tiers import (
    CacheSummary,
    CallContext,
    DecodeArgs,
    DecodeChunk,
    PrefillResult,
    Reservation,
    SpeculationCounts,
)
from prefill_svc.engine import PrefillEngine, PrefillJob

PREFIX_ROOT = root_hash("in-process tests")


def runner_over(model, num_blocks: int, block_size: int = 16,
                prefix_caching: bool = True) -> tuple[ModelRunner, BlockManager]:
    c = model.config
    kv = KvPool(num_layers=c.num_layers, num_blocks=num_blocks, block_size=block_size,
                num_kv_heads=c.num_kv_heads, head_dim=c.head_dim, dtype=torch.float32)
    return ModelRunner(model, kv), BlockManager(num_blocks, block_size,
                                                prefix_root=PREFIX_ROOT if prefix_caching else None)


def prefill_engine(model, num_blocks: int = 64, chunk_size: int = 32, prefix_caching: bool = True) -> PrefillEngine:
    runner, blocks = runner_over(model, num_blocks, prefix_caching=prefix_caching)
    return PrefillEngine(runner, blocks, chunk_size=chunk_size, max_batch_tokens=4 * chunk_size)


def decode_engine(model, model_dir, num_blocks: int = 64, lease_s: float = 30.0, prefix_caching: bool = True,
                  kv_growth: str = "lazy", max_batch_size: int = DecodeConfig.max_batch_size,
                  step_prefill_tokens: int = 0) -> DecodeEngine:
    runner, blocks = runner_over(model, num_blocks, prefix_caching=prefix_caching)
    return DecodeEngine(runner, blocks, Scheduler(max_batch_size), lease_s, TextTokenizer(model_dir),
                        kv_growth=kv_growth, step_prefill_tokens=step_prefill_tokens)


def _typed(error: PdserveError) -> PdserveError:
    """What a gRPC hop would make of the tier's error: the same status and message, as Upstream."""
    return error if isinstance(error, Cancelled) else Upstream(status_of(error).name, str(error))


@dataclass
class _Done:
    """A call that completed (or failed) when it was made."""

    value: object = None
    error: PdserveError | None = None

    def result(self):
        if self.error is not None:
            raise self.error
        return self.value

    def cancel(self) -> None:
        pass


@dataclass
class _PrefillCall:
    engine: PrefillEngine
    job: PrefillJob
    sender: InProcessKvSender

    def result(self) -> PrefillResult:
        self.job.done.wait()
        if self.job.cancelled:
            raise Cancelled("prefill was cancelled")
        try:
            ack = self.sender.wait()
        except PdserveError as error:
            raise _typed(error) from None
        job = self.job
        return PrefillResult(job.first_token, (job.started_at - job.enqueued_at) * 1000,
                             (job.computed_at - job.started_at) * 1000, 0.0, ack.num_bytes, job.num_chunks,
                             job.num_cached)

    def cancel(self) -> None:
        self.engine.cancel(self.job)


@dataclass
class _DecodeStream:
    engine: DecodeEngine
    seq: object

    def __iter__(self):
        while True:
            event = self.seq.outbox.get()
            if event.finish_reason == FINISH_SHUTDOWN:  # what the gRPC servicer answers UNAVAILABLE
                raise _typed(Unavailable("the decode instance is shutting down"))
            spec = event.spec
            counts = None if spec is None else SpeculationCounts(spec.num_proposed, spec.num_accepted,
                                                                 spec.num_verify_steps, spec.num_verify_tokens)
            yield DecodeChunk(list(event.token_ids), event.finish_reason, counts, event.local_prefill_ms)
            if event.finish_reason:
                return

    def cancel(self) -> None:
        self.engine.cancel(self.seq)


class InProcessTiers:
    def __init__(self, prefill: dict[str, PrefillEngine], decode: dict[str, DecodeEngine]) -> None:
        self.prefill_engines, self.decode_engines = prefill, decode

    @contextmanager
    def running(self):
        """Every engine started inside the block, and stopped however it ends."""
        engines = [*self.prefill_engines.values(), *self.decode_engines.values()]
        for engine in engines:
            engine.start()
        try:
            yield self
        finally:
            for engine in engines:
                engine.stop()

    def reserve(self, address: str, prompt_ids: list[int], max_new_tokens: int, lease_ms: int,
                ctx: CallContext) -> _Done:
        try:
            reserved = self.decode_engines[address].reserve(len(prompt_ids), max_new_tokens, lease_ms / 1000,
                                                            list(prompt_ids))
        except PdserveError as error:
            return _Done(error=_typed(error))
        return _Done(Reservation(reserved.handle, reserved.num_cached_tokens))

    def prefill(self, address: str, prompt_ids: list[int], sampling: SamplingConfig, decode_address: str,
                handle: str, ctx: CallContext, first_step: int = 0, kv_skip_tokens: int = 0) -> _PrefillCall:
        sender = InProcessKvSender(self.decode_engines[decode_address], handle)
        job = PrefillJob(ctx.request_id, list(prompt_ids), sampling, sender, first_step, kv_skip_tokens)
        return _PrefillCall(self.prefill_engines[address], self.prefill_engines[address].submit(job), sender)

    def decode(self, address: str, args: DecodeArgs, ctx: CallContext) -> _DecodeStream:
        engine = self.decode_engines[address]
        try:
            seq = engine.start_decode(args.handle, args.first_token, args.max_new_tokens, args.sampling,
                                      args.stop_token_ids, args.stop, args.prompt_ids, args.speculative,
                                      args.first_step, args.prefill_locally)
        except PdserveError as error:
            raise _typed(error) from None
        return _DecodeStream(engine, seq)

    def release(self, address: str, handle: str, ctx: CallContext) -> None:
        self.decode_engines[address].release(handle)

    def serving(self, address: str) -> bool:
        return True

    def decode_slots(self, address: str) -> int | None:
        return self.decode_engines[address].scheduler.max_batch_size

    def cache_summary(self, address: str, known_version: int) -> CacheSummary | None:
        engine = self.prefill_engines.get(address) or self.decode_engines[address]
        s = engine.cache_summary(known_version)
        return CacheSummary("in-process tests", engine.blocks.block_size, s.version,
                            None if s.hashes is None else frozenset(s.hashes), s.num_blocks_total, s.num_blocks_free,
                            s.num_requests, s.num_queued_tokens, s.prefix_caching)

