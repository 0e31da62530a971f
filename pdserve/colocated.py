"""`pdserve colocated`: the prefill and decode engines in ONE process over ONE copy of the weights, the
baseline that disaggregation is measured against (`pdserve up --colocated`).

Both services are served by one gRPC server, listening on the prefill port and on the decode port, so the
gateway and the KV push protocol run unchanged: the prefill engine still pushes each layer's KV to the
decode engine (over loopback, into the same process). What changes is that both engines' steps share this
process's cores, torch thread pool and interpreter, so a long prompt's prefill competes with the running
decode batch: the interference that separate tiers remove.
"""

from dataclasses import dataclass

import grpc
from prometheus_client import CollectorRegistry

from common.basics.config import DecodeConfig, PrefillConfig
from common.basics.tokenizer import TextTokenizer
from common.edge.metrics import (
    DECODE_STATS,
    PREFILL_STATS,
    DecodeMetrics,
    PrefillMetrics,
    StatsCollector,
)
from common.edge.server import add_health, bind, make_server, set_serving
from common.runtime.tier import TierRuntime, build_runtime, runtime_for
from decode_svc.draft import draft_for
from decode_svc.engine import DecodeEngine
from decode_svc.scheduler import Scheduler
from decode_svc.server import SERVICE_NAME as DECODE_SERVICE
from decode_svc.server import DecodeServicer
from decode_svc.speculation import SpeculationConfig
from pdserve.cli import speculation_fields
from pdserve.v1 import decode_pb2_grpc, prefill_pb2_grpc
from prefill_svc.engine import PrefillEngine
from prefill_svc.server import SERVICE_NAME as PREFILL_SERVICE
from prefill_svc.server import PrefillServicer


@dataclass
class RunningColocated:
    server: grpc.Server
    port: int
    decode_port: int
    prefill_engine: PrefillEngine
    decode_engine: DecodeEngine

    def stop(self, grace_s: float = 2.0) -> None:
        self.prefill_engine.stop()
        self.decode_engine.stop()
        self.server.stop(grace_s).wait()


def _load_shared(prefill: PrefillConfig, decode: DecodeConfig) -> tuple[TierRuntime, TierRuntime]:
    """The prefill side is built as any tier is (threads, model, KV pool, fingerprint); the decode side gets
    its own KV pool and block manager over the same model object."""
    if (prefill.model_dir, prefill.weights, prefill.kv_dtype, prefill.block_size, prefill.device) != (
            decode.model_dir, decode.weights, decode.kv_dtype, decode.block_size, decode.device):
        raise ValueError("colocated prefill and decode must share the model, weights, KV dtype, block size and device")
    prefill_rt = build_runtime(prefill)
    return prefill_rt, runtime_for(prefill_rt.runner.model, decode, prefill_rt.compat)


def start_colocated(prefill: PrefillConfig, decode: DecodeConfig,
                    registry: CollectorRegistry | None = None) -> RunningColocated:
    """Serves Prefill and Decode from this process; prefill.port and decode.port both reach both services.
    Metrics go to `registry` (a private one when None), as start_prefill and start_decode do."""
    prefill_rt, decode_rt = _load_shared(prefill, decode)
    prefill_engine = PrefillEngine(prefill_rt.runner, prefill_rt.blocks, chunk_size=prefill.chunk_size,
                                   max_batch_tokens=prefill.max_batch_tokens)
    speculation = SpeculationConfig(decode.speculative, decode.num_speculative_tokens, decode.speculative_max_batch,
                                    decode.speculative_adaptive)
    decode_engine = DecodeEngine(decode_rt.runner, decode_rt.blocks, Scheduler(decode.max_batch_size),
                                 decode.lease_ms / 1000, TextTokenizer(decode.model_dir), speculation,
                                 draft_for(decode, decode_rt.runner, decode_rt.blocks))
    server = make_server()
    health = add_health(server)
    registry = registry or CollectorRegistry()
    registry.register(StatsCollector(prefill_engine.stats, PREFILL_STATS, tier="prefill"))
    registry.register(StatsCollector(decode_engine.stats, DECODE_STATS, tier="decode"))
    vocab_size = prefill_rt.runner.model.config.vocab_size
    prefill_pb2_grpc.add_PrefillServicer_to_server(
        PrefillServicer(prefill_engine, prefill_rt.compat, vocab_size, PrefillMetrics(registry)), server)
    decode_pb2_grpc.add_DecodeServicer_to_server(
        DecodeServicer(decode_engine, decode_rt.compat, DecodeMetrics(registry)), server)
    port = bind(server, prefill.host, prefill.port)
    decode_port = port if decode.port in (0, port) else bind(server, decode.host, decode.port)
    prefill_engine.start()
    decode_engine.start()
    server.start()
    set_serving(health, [PREFILL_SERVICE, DECODE_SERVICE])
    return RunningColocated(server, port, decode_port, prefill_engine, decode_engine)


def configs_from_args(args) -> tuple[PrefillConfig, DecodeConfig]:
    shared = dict(model_dir=args.model, host=args.host, block_size=args.block_size, kv_dtype=args.kv_dtype,
                  threads=args.threads, device=args.device, weights=args.weights,
                  cpu_weight_layout=args.cpu_weight_layout)
    prefill = PrefillConfig(**shared, port=args.port, kv_memory_mb=args.prefill_kv_memory_mb,
                            chunk_size=args.chunk_size, max_batch_tokens=args.max_batch_tokens)
    decode = DecodeConfig(**shared, port=args.decode_port, kv_memory_mb=args.decode_kv_memory_mb,
                          max_batch_size=args.max_batch_size, lease_ms=args.lease_ms, **speculation_fields(args))
    return prefill, decode
