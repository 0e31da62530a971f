"""The prefill service edge: validates, checks the decode instance's KV layout, runs the engine."""

import threading
import time
import uuid
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health
from opentelemetry import trace
from opentelemetry.trace import SpanKind
from prometheus_client import CollectorRegistry

from common.basics.compat import Compat
from common.basics.config import PrefillConfig
from common.basics.errors import (
    Cancelled,
    FailedPrecondition,
    Internal,
    PdserveError,
    PermissionDenied,
    Unavailable,
)
from common.basics.grammar import model_grammars
from common.basics.request_id import checked_request_id
from common.edge.discovery import Instance, parse_target, resolve
from common.edge.errors import maps_errors, status_of
from common.edge.metrics import PREFILL_STATS, PrefillMetrics, StatsCollector
from common.edge.proto import cache_summary_to_proto, compat_from_proto, compat_to_proto
from common.edge.server import (
    MESSAGE_MARGIN_BYTES,
    REQUEST_ID_KEY,
    Tls,
    add_health,
    bind,
    drain,
    make_channel,
    make_server,
    metadata_value,
    set_serving,
    time_remaining_s,
)
from common.edge.tracing import incoming_context, tracer
from common.kv.grpc_transport import GrpcKvSender
from common.kv.nixl_stream import NixlKvSender
from common.kv.nixl_transport import NixlKvAgent, pool_tensors
from common.kv.transport import KvSender
from common.runtime.tier import TierRuntime, build_runtime
from pdserve.v1 import decode_pb2, decode_pb2_grpc, prefill_pb2, prefill_pb2_grpc
from prefill_svc.convert import (
    PrefillCall,
    call_from_proto,
    reply_to_proto,
    stats_to_proto,
)
from prefill_svc.engine import PrefillEngine, PrefillJob
from prefill_svc.observe import record_prefill

SERVICE_NAME = "pdserve.v1.Prefill"
_POLL_S = 0.25
_INFO_TIMEOUT_S = 5.0
_RESOLVE_AGAIN_S = 1.0  # a request naming an unknown decode address re-resolves the dns: names at most this often


class DecodePeers:
    """Channels to decode instances, each checked once for a compatible KV layout; mutual TLS when this tier
    has an identity. Only instances on the --decode list get KV: a listed host:port, or an address a listed
    dns: name resolves to (resolved again when a request names an address not seen yet, at most once a second;
    the certificate is then checked against the name)."""

    def __init__(self, compat: Compat, allowed: tuple[str, ...], tls: Tls | None = None,
                 kv_transport: str = "grpc") -> None:
        self.compat = compat
        self.kv_transport = kv_transport
        self.targets = [parse_target(t) for t in allowed]
        self.allowed = frozenset(t.text for t in self.targets if not t.resolved)
        self.tls = tls
        self._stubs: dict[str, decode_pb2_grpc.DecodeStub] = {}
        self._named: dict[str, dict[str, Instance]] = {}  # dns target -> address -> instance, as last resolved
        self._resolved_at = float("-inf")
        self._lock = threading.Lock()

    def stub_for(self, address: str) -> decode_pb2_grpc.DecodeStub:
        instance = self._instance(address)
        if instance is None:
            known = ", ".join(t.text for t in self.targets) or "none: start it with --decode HOST:PORT"
            raise PermissionDenied(f"decode instance {address!r} is not one this prefill tier pushes KV to "
                                   f"(its --decode list: {known})")
        with self._lock:
            stub = self._stubs.get(address)
        if stub is not None:
            return stub
        stub = decode_pb2_grpc.DecodeStub(make_channel(address, self.tls, instance.tls_name))
        try:
            info = stub.GetInfo(decode_pb2.GetInfoRequest(), timeout=_INFO_TIMEOUT_S)
        except grpc.RpcError as error:
            raise Unavailable(f"decode instance {address} did not answer GetInfo: {error.details()}") from None
        theirs, transport = compat_from_proto(info), info.kv_transport or "grpc"
        if transport != self.kv_transport:
            raise FailedPrecondition(
                f"decode instance {address} receives KV over {transport}, this prefill tier sends it over "
                f"{self.kv_transport}; start prefill and decode with the same --kv-transport")
        if theirs != self.compat:
            raise FailedPrecondition(
                f"decode instance {address} has an incompatible KV layout ({'; '.join(self.compat.differences(theirs))}); "
                "run prefill and decode with the same model, --kv-dtype and --block-size"
            )
        with self._lock:
            self._stubs[address] = stub
        return stub

    def _instance(self, address: str) -> Instance | None:
        if address in self.allowed:
            return Instance(address)
        with self._lock:
            found = self._find(address)
            if found is None and time.monotonic() - self._resolved_at >= _RESOLVE_AGAIN_S:
                self._resolved_at = time.monotonic()
                for target in (t for t in self.targets if t.resolved):
                    instances = resolve(target)
                    if instances is not None:  # a failed lookup keeps what the name had
                        self._named[target.text] = {i.address: i for i in instances}
                found = self._find(address)
            return found

    def _find(self, address: str) -> Instance | None:
        return next((named[address] for named in self._named.values() if address in named), None)


class PrefillServicer(prefill_pb2_grpc.PrefillServicer):
    def __init__(self, engine: PrefillEngine, compat: Compat, vocab_size: int, metrics: PrefillMetrics,
                 decode_addresses: tuple[str, ...], tls: Tls | None = None, weight_format: str = "",
                 nixl: NixlKvAgent | None = None) -> None:
        self.engine = engine
        self.nixl = nixl  # --kv-transport nixl: the agent over this instance's pool; None: KV goes by PushKv
        self.weight_format = weight_format  # reported in cache summaries
        self.metrics = metrics
        self.compat = compat
        self.vocab_size = vocab_size
        self.peers = DecodePeers(compat, decode_addresses, tls, "grpc" if nixl is None else "nixl")
        self._tracer = tracer("pdserve.prefill")

    @maps_errors
    def GetInfo(self, request, context):
        return compat_to_proto(self.compat)

    @maps_errors
    def Stats(self, request, context):
        return stats_to_proto(self.engine.stats())

    @maps_errors
    def GetCacheSummary(self, request, context):
        return cache_summary_to_proto(self.engine.cache_summary(request.known_version), self.compat,
                                      self.weight_format)

    @maps_errors
    def Prefill(self, request, context):
        request_id = checked_request_id(request.request_id or metadata_value(context, REQUEST_ID_KEY) or "")
        with self._tracer.start_as_current_span("prefill", context=incoming_context(context), kind=SpanKind.SERVER,
                                                attributes={"pdserve.request_id": request_id,
                                                            "pdserve.prompt_tokens": len(request.prompt_token_ids),
                                                            "pdserve.kv.transport": self.peers.kv_transport}):
            try:
                reply = self._prefill(call_from_proto(request, self.vocab_size, request_id), context)
            except PdserveError as error:
                self.metrics.requests.labels(status_of(error).name).inc()
                raise
        self.metrics.requests.labels(grpc.StatusCode.OK.name).inc()
        return reply

    def _sender(self, call: PrefillCall, span, timeout_s: float | None) -> KvSender:
        stub = self.peers.stub_for(call.decode_address)
        if self.nixl is not None:
            return NixlKvSender(stub, self.nixl, handle=call.kv_handle, fingerprint=self.compat.fingerprint,
                                kv_skip=call.kv_skip, request_id=call.request_id, trace_parent=span,
                                timeout_s=timeout_s)
        return GrpcKvSender(stub, handle=call.kv_handle, fingerprint=self.compat.fingerprint,
                            kv_dtype=self.compat.kv_dtype, request_id=call.request_id, trace_parent=span,
                            timeout_s=timeout_s)

    def _prefill(self, call: PrefillCall, context) -> prefill_pb2.PrefillResponse:
        span = trace.get_current_span()
        sender = self._sender(call, span, time_remaining_s(context))
        job = PrefillJob(call.request_id, call.prompt_ids, call.sampling, sender, call.first_step, call.kv_skip)
        self.engine.submit(job)
        context.add_callback(lambda: self.engine.cancel(job))
        while not job.done.wait(_POLL_S):
            if not context.is_active():
                self.engine.cancel(job)
        if job.failed:
            raise Internal("a prefill step failed; the prefill tier's log has the details")
        if job.cancelled:
            raise Cancelled("prefill was cancelled")
        ack = sender.wait()
        transferred_at = time.monotonic()
        record_prefill(span, self.metrics, job, sender, ack, transferred_at)
        return reply_to_proto(job, ack, transferred_at)


@dataclass
class PrefillService:
    """The prefill tier's parts, wired: its engine, the servicer in front of it, and the largest message a valid
    caller sends it (a whole context of token ids)."""

    engine: PrefillEngine
    servicer: PrefillServicer
    max_receive_bytes: int

    def add_to(self, server: grpc.Server) -> None:
        prefill_pb2_grpc.add_PrefillServicer_to_server(self.servicer, server)


def build_prefill(config: PrefillConfig, registry: CollectorRegistry,
                  runtime: TierRuntime | None = None) -> PrefillService:
    """The engine and servicer of a prefill tier (over `runtime` when given); its metrics go to `registry`."""
    runtime = runtime or build_runtime(config)
    engine = PrefillEngine(runtime.runner, runtime.blocks, chunk_size=config.chunk_size,
                           max_batch_tokens=config.max_batch_tokens, max_queued=config.max_queued_prompts,
                           grammars=model_grammars(config.model_dir, runtime.runner.model.config))
    registry.register(StatsCollector(engine.stats, PREFILL_STATS, tier="prefill"))
    model = runtime.runner.model.config
    tls = Tls.from_files(config.tls_cert, config.tls_key, config.tls_ca)
    nixl = None
    if config.kv_transport == "nixl":
        nixl = NixlKvAgent(f"prefill-{uuid.uuid4().hex[:12]}", pool_tensors(runtime.runner.kv), config.block_size)
    servicer = PrefillServicer(engine, runtime.compat, model.vocab_size, PrefillMetrics(registry),
                               config.decode_addresses, tls, config.weights, nixl)
    # token ids are varints of at most 5 bytes
    return PrefillService(engine, servicer, 5 * model.max_position_embeddings + MESSAGE_MARGIN_BYTES)


@dataclass
class RunningPrefill:
    server: grpc.Server
    port: int
    engine: PrefillEngine
    health: health.HealthServicer

    def drain(self, timeout_s: float) -> bool:
        """SIGTERM's first half: NOT_SERVING at once, nothing new admitted, what is held finishes (up to
        timeout_s). Returns whether everything finished."""
        self.engine.draining = True
        return drain(self.health, [SERVICE_NAME], self.engine.busy, timeout_s)

    def stop(self, grace_s: float = 2.0) -> None:
        self.engine.stop()
        self.server.stop(grace_s).wait()


def start_prefill(config: PrefillConfig, registry: CollectorRegistry | None = None) -> RunningPrefill:
    """Serves the prefill tier; its metrics go to `registry` (a private one when None: nothing serves it)."""
    tls = Tls.from_files(config.tls_cert, config.tls_key, config.tls_ca)
    service = build_prefill(config, registry or CollectorRegistry())
    server = make_server(service.max_receive_bytes)
    health = add_health(server)
    service.add_to(server)
    port = bind(server, config.host, config.port, tls.server_credentials() if tls else None)
    service.engine.start()
    server.start()
    set_serving(health, [SERVICE_NAME])
    return RunningPrefill(server, port, service.engine, health)
