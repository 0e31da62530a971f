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
from grpc_health.v1 import health
from prometheus_client import CollectorRegistry

from common.basics.config import DecodeConfig, PrefillConfig
from common.edge.server import Tls, add_health, bind, drain, make_server, set_serving
from common.runtime.tier import TierRuntime, build_runtime, runtime_for
from decode_svc.engine import DecodeEngine
from decode_svc.server import SERVICE_NAME as DECODE_SERVICE
from decode_svc.server import build_decode
from prefill_svc.engine import PrefillEngine
from prefill_svc.server import SERVICE_NAME as PREFILL_SERVICE
from prefill_svc.server import build_prefill


@dataclass
class RunningColocated:
    server: grpc.Server
    port: int
    decode_port: int
    prefill_engine: PrefillEngine
    decode_engine: DecodeEngine
    health: health.HealthServicer

    def drain(self, timeout_s: float) -> bool:
        """As each tier drains: NOT_SERVING, nothing new, what is held finishes (up to timeout_s)."""
        self.prefill_engine.draining = self.decode_engine.draining = True
        return drain(self.health, [PREFILL_SERVICE, DECODE_SERVICE],
                     lambda: self.prefill_engine.busy() or self.decode_engine.busy(), timeout_s)

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
    registry = registry or CollectorRegistry()
    prefill_side = build_prefill(prefill, registry, prefill_rt)
    decode_side = build_decode(decode, registry, decode_rt)
    tls = Tls.from_files(prefill.tls_cert, prefill.tls_key, prefill.tls_ca)
    credentials = tls.server_credentials() if tls else None
    server = make_server(max(prefill_side.max_receive_bytes, decode_side.max_receive_bytes))
    health = add_health(server)
    prefill_side.add_to(server)
    decode_side.add_to(server)
    port = bind(server, prefill.host, prefill.port, credentials)
    decode_port = port if decode.port in (0, port) else bind(server, decode.host, decode.port, credentials)
    prefill_side.engine.start()
    decode_side.engine.start()
    server.start()
    set_serving(health, [PREFILL_SERVICE, DECODE_SERVICE])
    return RunningColocated(server, port, decode_port, prefill_side.engine, decode_side.engine, health)
