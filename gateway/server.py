"""The gateway service edge: validate and tokenize, run the Generation, stream text back."""

import math
import queue
import threading
import time
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry

from common.basics.config import GatewayConfig
from common.basics.errors import InvalidArgument, PdserveError, RateLimited, Unavailable
from common.basics.grammar import model_grammars
from common.basics.model_config import ModelConfig
from common.basics.tokenizer import TextTokenizer
from common.edge.auth import ApiKeys, authorization_of
from common.edge.discovery import Instance
from common.edge.errors import maps_errors, status_of
from common.edge.metrics import GatewayMetrics
from common.edge.server import (
    MESSAGE_MARGIN_BYTES,
    REQUEST_ID_KEY,
    Tls,
    add_health,
    bind,
    drain,
    make_server,
    metadata_value,
    set_not_serving,
    set_serving,
    time_remaining_s,
)
from common.edge.tracing import child_span, incoming_context
from gateway.convert import (
    FINISH_REASON_NAMES,
    completed,
    detokenized,
    last_reply,
    spec_from_request,
    token_reply,
    tokenized,
    with_response_format,
)
from gateway.fleet import Fleet
from gateway.generation import Generation
from gateway.grpc_tiers import GrpcTiers
from gateway.http_front import HttpServer, OpenAIFront
from gateway.kv_index import PrefixIndex
from gateway.membership import Membership
from gateway.observe import RequestObserver
from gateway.router import Router
from gateway.text_stream import TextStream
from gateway.tiers import Tiers
from pdserve.v1 import gateway_pb2, gateway_pb2_grpc

SERVICE_NAME = "pdserve.v1.Gateway"
_INSTANCE_PREFIX = "pdserve.instance/"


def instance_service(address: str) -> str:
    """The health service name under which the gateway reports whether a tier instance is in its rotation:
    SERVING when it is, NOT_SERVING when it is not."""
    return _INSTANCE_PREFIX + address


class GatewayServicer(gateway_pb2_grpc.GatewayServicer):
    def __init__(self, config: GatewayConfig, tokenizer: TextTokenizer, model: ModelConfig, tiers: Tiers,
                 metrics: GatewayMetrics, keys: ApiKeys, membership: Membership | None = None,
                 index: PrefixIndex | None = None) -> None:
        self.config = config
        self.keys = keys
        self.tokenizer = tokenizer
        self.model = model
        self.grammars = model_grammars(config.model_dir, model)  # checks response formats
        self.tiers = tiers
        # the instances found behind the tier lists (gateway/fleet.py) when Membership follows them
        prefill, decode = (membership.tiers["prefill"], membership.tiers["decode"]) if membership else \
            (config.prefill_addresses, config.decode_addresses)
        self.router = Router(prefill, decode, membership, index, config.prefix_weight)
        self.metrics = metrics
        self.draining = False  # set on SIGTERM: new requests are turned away, those in flight finish
        self.in_flight = 0
        self._mean_duration_s = 1.0  # of recent requests (moving average): how soon a slot frees
        self._lock = threading.Lock()

    @maps_errors
    def Generate(self, request, context):
        with self._lock:
            if self.draining:
                raise Unavailable("this gateway is shutting down; send the request to another")
            self._admit()
            self.in_flight += 1
        started = time.monotonic()
        try:
            yield from self._observed(request, context)
        finally:
            with self._lock:
                self.in_flight -= 1
                self._mean_duration_s += 0.1 * (time.monotonic() - started - self._mean_duration_s)

    @maps_errors
    def Complete(self, request, context):
        if request.HasField("n") and request.n != 1:
            raise InvalidArgument("Complete returns one completion; ask Generate for n > 1 (each message names its "
                                  "completion by index)")
        return completed(list(self.Generate(request, context)))

    @maps_errors
    def Tokenize(self, request, context):
        self.keys.authenticate(authorization_of(context.invocation_metadata() or ()))
        return tokenized(request, self.tokenizer, self.model.max_position_embeddings)

    @maps_errors
    def Detokenize(self, request, context):
        self.keys.authenticate(authorization_of(context.invocation_metadata() or ()))
        return detokenized(request, self.tokenizer, self.model.max_position_embeddings)

    @maps_errors
    def GetModelInfo(self, request, context):
        self.keys.authenticate(authorization_of(context.invocation_metadata() or ()))
        return gateway_pb2.ModelInfo(
            model_id=self.config.model_dir.name, context_length=self.model.max_position_embeddings,
            vocab_size=self.tokenizer.vocab_size, eos_token_ids=self.model.eos_token_ids,
            max_new_tokens_limit=self.config.max_new_tokens_limit,
            default_max_new_tokens=self.config.default_max_new_tokens,
            max_stop_strings=self.config.max_stop_strings, max_logprobs=self.config.max_logprobs,
            max_completions=self.config.max_completions,
            instances=self._instances())

    def _instances(self) -> list[gateway_pb2.TierInstance]:
        membership, index = self.router.membership, self.router.index
        found = []
        for tier in ("prefill", "decode"):
            addresses = membership.tiers[tier] if membership else getattr(self.config, f"{tier}_addresses")
            up = set(membership.up(tier)) if membership else set(addresses)
            for address in addresses:
                summary = index.summary(address) if index else None
                found.append(gateway_pb2.TierInstance(
                    tier=tier, address=address, in_rotation=address in up,
                    weight_format=summary.weight_format if summary else "",
                    kv_dtype=summary.kv_dtype if summary else "", block_size=summary.block_size if summary else 0))
        return found

    def _admit(self) -> None:
        """Admission control, under the lock: at most admission_factor requests per decode batch slot in
        rotation are in flight; beyond, turned away at once with a retry delay (when a slot should free, on
        average). With no decode instance in rotation the request goes on, to hear UNAVAILABLE from the router."""
        slots = self.router.membership.decode_slots() if self.router.membership is not None else 0
        limit = math.ceil(self.config.admission_factor * slots)
        if slots and self.in_flight >= limit:
            raise RateLimited(f"the service is at capacity ({self.in_flight} requests in flight for {slots} decode "
                              "batch slots); retry after the delay in grpc-retry-pushback-ms",
                              retry_after_s=max(self._mean_duration_s / max(self.in_flight, 1), 0.05))

    def _observed(self, request, context):
        operation = "chat" if request.WhichOneof("input") == "messages" else "text_completion"
        observer = RequestObserver(self.metrics, operation=operation, model=self.config.model_dir.name,
                                   parent=incoming_context(context))
        try:
            yield from self._generate(request, context, observer)
        except PdserveError as error:
            observer.failed(status_of(error), str(error))
            raise
        finally:
            observer.end()

    def _generate(self, request, context, observer: RequestObserver):
        caller = self.keys.authenticate(authorization_of(context.invocation_metadata() or ()))
        with child_span("tokenize", observer.span):
            spec = spec_from_request(request, self.tokenizer, self.config, self.model.max_position_embeddings,
                                     metadata_value(context, REQUEST_ID_KEY))
            spec = with_response_format(spec, request, self.grammars)
        observer.tokenized(spec)
        admission = self.keys.admit(caller, len(spec.prompt_ids) + spec.n * spec.max_new_tokens)
        try:
            yield from self._serve(spec, context, observer)
        finally:  # however it ended, the key is charged for what was actually used
            admission.release(len(spec.prompt_ids) + observer.num_output_tokens)

    def _serve(self, spec, context, observer: RequestObserver):
        spec = spec.with_stops(frozenset(self.model.eos_token_ids))
        replies = self._completion(spec, 0, context, observer) if spec.n == 1 else \
            self._completions(spec, context, observer)
        remaining = spec.n
        for reply in replies:
            observer.tokens(len(reply.token_ids))
            if reply.finish_reason:
                remaining -= 1
                if not remaining:
                    observer.finished(FINISH_REASON_NAMES[reply.finish_reason])
            yield reply

    def _completion(self, spec, index: int, context, observer: RequestObserver):
        """One completion's replies (index: which of the request's n it is)."""
        remaining = time_remaining_s(context)
        generation = Generation(
            spec, self.router, self.tiers, eos_token_ids=spec.stopping_token_ids(frozenset(self.model.eos_token_ids)),
            lease_ms=self.config.lease_ms, deadline=observer.arrived + remaining if remaining is not None else None,
            trace_parent=observer.span, local_prefill_tokens=self.config.local_prefill_tokens,
        )
        context.add_callback(generation.cancel)
        text = TextStream(self.tokenizer, spec.stop)
        num_tokens, first_at = 0, None
        for chunk in generation.run():
            num_tokens += len(chunk.token_ids)
            if chunk.token_ids and first_at is None:
                first_at = time.monotonic()
            delta = text.push(chunk.token_ids)
            reason = "stop" if text.stopped else chunk.finish_reason
            if reason is None:
                yield token_reply(chunk.token_ids, delta, spec.request_id, chunk.logprobs, index)
                continue
            generation.cancel()
            yield last_reply(chunk.token_ids, delta + text.finish(), spec.request_id, reason, len(spec.prompt_ids),
                             num_tokens, _timings(generation, observer.arrived, first_at or time.monotonic()),
                             chunk.speculation, generation.num_migrations, generation.timings.cached_tokens,
                             chunk.logprobs, index)
            return

    def _completions(self, spec, context, observer: RequestObserver):
        """The replies of n completions, interleaved as they come. Completion 0 runs first: once its first token
        is out, its prompt's KV is in the prefix caches, and the others start, finding it there. A failure of one
        ends the call; the others then stop, their cancels being the call's callbacks."""
        replies: queue.Queue = queue.Queue()

        def run(index: int) -> None:
            try:
                for reply in self._completion(spec.for_completion(index), index, context, observer):
                    replies.put(reply)
            except BaseException as error:  # handed to the caller's thread, which raises it
                replies.put(error)

        threads = [threading.Thread(target=run, args=(i,), name=f"completion-{i}", daemon=True)
                   for i in range(spec.n)]
        threads[0].start()
        finished = 0
        while finished < spec.n:
            reply = replies.get()
            if isinstance(reply, BaseException):
                raise reply
            if threads[1].ident is None:  # completion 0's first reply: the rest start now
                for thread in threads[1:]:
                    thread.start()
            finished += bool(reply.finish_reason)
            yield reply


def _timings(generation: Generation, arrived: float, first_at: float) -> dict:
    """gateway_pb2.Timings fields: milliseconds, the prefill path and the KV bytes pushed."""
    now = time.monotonic()
    return {"queue_ms": generation.timings.queue_ms, "prefill_ms": generation.timings.prefill_ms,
            "kv_transfer_ms": generation.timings.kv_transfer_ms, "prefill_path": generation.timings.prefill_path,
            "kv_bytes": generation.timings.kv_bytes,
            "time_to_first_token_ms": (first_at - arrived) * 1000, "decode_ms": (now - first_at) * 1000,
            "total_ms": (now - arrived) * 1000}


@dataclass
class RunningGateway:
    server: grpc.Server
    port: int
    servicer: GatewayServicer
    health: health.HealthServicer
    membership: Membership
    index: PrefixIndex
    fleet: Fleet
    http: HttpServer | None = None  # the OpenAI-compatible front, when --http-port is given

    @property
    def http_port(self) -> int | None:
        return self.http.port if self.http else None

    def drain(self, timeout_s: float) -> bool:
        """NOT_SERVING at once, new requests turned away, those in flight finish (up to timeout_s)."""
        self.servicer.draining = True
        return drain(self.health, [SERVICE_NAME], lambda: self.servicer.in_flight > 0, timeout_s)

    def stop(self, grace_s: float = 2.0) -> None:
        if self.http is not None:
            self.http.stop()
        self.fleet.stop()
        self.membership.stop()
        self.index.stop()
        self.server.stop(grace_s).wait()


def start_gateway(config: GatewayConfig, registry: CollectorRegistry | None = None) -> RunningGateway:
    """Serves the gateway; its metrics go to `registry` (a private one when None: nothing serves it)."""
    # Static addresses and DNS names (dns:///NAME:PORT), resolved now and followed from then on.
    fleet = Fleet({"prefill": config.prefill_addresses, "decode": config.decode_addresses}, config.resolve_interval_s)
    fleet.resolve_now()
    prefill_addresses, decode_addresses = fleet.addresses("prefill"), fleet.addresses("decode")
    tiers = GrpcTiers((), (), Tls.from_files(config.tls_cert, config.tls_key, config.tls_ca))
    for tier in ("prefill", "decode"):
        for instance in fleet.instances[tier].values():
            tiers.add(tier, instance)
    tokenizer, model = TextTokenizer(config.model_dir), ModelConfig.from_dir(config.model_dir)
    keys = ApiKeys.load(config.api_keys_file) if config.api_keys_file else ApiKeys.disabled()
    # The largest valid request: a whole context of the longest tokens, with room for the other fields.
    server = make_server(model.max_position_embeddings * tokenizer.max_token_bytes + MESSAGE_MARGIN_BYTES)
    health = add_health(server)
    servicer: GatewayServicer | None = None

    def report(can_serve: bool) -> None:  # SERVING only while a prefill and a decode instance are in rotation
        if can_serve and not (servicer and servicer.draining):
            set_serving(health, [SERVICE_NAME])
        else:
            set_not_serving(health, [SERVICE_NAME])

    def report_instance(address: str, up: bool) -> None:  # each instance's place in rotation, for operators
        health.set(instance_service(address), health_pb2.HealthCheckResponse.SERVING if up
                   else health_pb2.HealthCheckResponse.NOT_SERVING)

    membership = Membership(prefill_addresses, decode_addresses, tiers.serving, report,
                            slots=tiers.decode_slots, on_instance=report_instance)
    for address in (*prefill_addresses, *decode_addresses):
        report_instance(address, False)
    # What each instance's prefix cache holds and its load, for KV-aware routing (gateway/router.py).
    index = PrefixIndex((*prefill_addresses, *decode_addresses), tiers.cache_summary, config.cache_poll_ms / 1000)
    servicer = GatewayServicer(config, tokenizer, model, tiers, GatewayMetrics(registry or CollectorRegistry()), keys,
                               membership, index)
    gateway_pb2_grpc.add_GatewayServicer_to_server(servicer, server)
    reflection.enable_server_reflection(
        (gateway_pb2.DESCRIPTOR.services_by_name["Gateway"].full_name, reflection.SERVICE_NAME, "grpc.health.v1.Health"),
        server,
    )
    public_tls = None
    if config.public_tls_cert is not None:
        public_tls = grpc.ssl_server_credentials([(config.public_tls_key.read_bytes(),
                                                   config.public_tls_cert.read_bytes())])
    port = bind(server, config.host, config.port, public_tls)
    server.start()
    membership.start()
    index.start()

    def found(tier: str, instance: Instance) -> None:
        tiers.add(tier, instance)
        servicer.router.add(tier, instance.address)
        index.add(instance.address)
        membership.add(tier, instance.address)  # in rotation once it answers SERVING

    def gone(tier: str, address: str) -> None:
        membership.remove(address)
        index.remove(address)

    fleet.on_add, fleet.on_remove = found, gone
    fleet.start()
    http = None
    if config.http_port is not None:  # the OpenAI-compatible front, over the same servicer
        http = HttpServer(OpenAIFront(servicer, config.model_dir.name).app, config.host, config.http_port,
                          config.public_tls_cert, config.public_tls_key)
    return RunningGateway(server, port, servicer, health, membership, index, fleet, http)
