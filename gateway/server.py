"""The gateway service edge: validate and tokenize, run the Generation, stream text back."""

import time
from dataclasses import dataclass

import grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry

from common.basics.config import GatewayConfig
from common.basics.errors import PdserveError
from common.basics.model_config import ModelConfig
from common.basics.tokenizer import TextTokenizer
from common.edge.errors import maps_errors, status_of
from common.edge.metrics import GatewayMetrics
from common.edge.server import (
    REQUEST_ID_KEY,
    add_health,
    bind,
    make_server,
    metadata_value,
    set_serving,
    time_remaining_s,
)
from common.edge.tracing import child_span, incoming_context
from gateway.convert import last_reply, spec_from_request, token_reply
from gateway.generation import Generation
from gateway.grpc_tiers import GrpcTiers
from gateway.observe import RequestObserver
from gateway.router import Router
from gateway.text_stream import TextStream
from gateway.tiers import Tiers
from pdserve.v1 import gateway_pb2, gateway_pb2_grpc

SERVICE_NAME = "pdserve.v1.Gateway"


class GatewayServicer(gateway_pb2_grpc.GatewayServicer):
    def __init__(self, config: GatewayConfig, tokenizer: TextTokenizer, model: ModelConfig, tiers: Tiers,
                 metrics: GatewayMetrics) -> None:
        self.config = config
        self.tokenizer = tokenizer
        self.model = model
        self.tiers = tiers
        self.router = Router(config.prefill_addresses, config.decode_addresses)
        self.metrics = metrics

    @maps_errors
    def Generate(self, request, context):
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
        with child_span("tokenize", observer.span):
            spec = spec_from_request(request, self.tokenizer, self.config, self.model.max_position_embeddings,
                                     metadata_value(context, REQUEST_ID_KEY))
        observer.tokenized(spec)
        remaining = time_remaining_s(context)
        generation = Generation(
            spec, self.router, self.tiers, eos_token_ids=frozenset(self.model.eos_token_ids),
            lease_ms=self.config.lease_ms, deadline=observer.arrived + remaining if remaining is not None else None,
            trace_parent=observer.span,
        )
        context.add_callback(generation.cancel)
        text = TextStream(self.tokenizer, spec.stop)
        for chunk in generation.run():
            observer.tokens(len(chunk.token_ids))
            delta = text.push(chunk.token_ids)
            reason = "stop" if text.stopped else chunk.finish_reason
            if reason is None:
                yield token_reply(chunk.token_ids, delta, spec.request_id)
                continue
            generation.cancel()
            observer.finished(reason)
            yield last_reply(chunk.token_ids, delta + text.finish(), spec.request_id, reason, len(spec.prompt_ids),
                             observer.num_output_tokens, _timings(generation, observer.arrived, observer.first_at),
                             chunk.speculation)
            return


def _timings(generation: Generation, arrived: float, first_at: float) -> dict[str, float]:
    """Milliseconds by gateway_pb2.Timings field."""
    now = time.monotonic()
    return {"queue_ms": generation.timings.queue_ms, "prefill_ms": generation.timings.prefill_ms,
            "kv_transfer_ms": generation.timings.kv_transfer_ms,
            "time_to_first_token_ms": (first_at - arrived) * 1000, "decode_ms": (now - first_at) * 1000,
            "total_ms": (now - arrived) * 1000}


@dataclass
class RunningGateway:
    server: grpc.Server
    port: int

    def stop(self, grace_s: float = 2.0) -> None:
        self.server.stop(grace_s).wait()


def start_gateway(config: GatewayConfig, registry: CollectorRegistry | None = None) -> RunningGateway:
    """Serves the gateway; its metrics go to `registry` (a private one when None: nothing serves it)."""
    tiers = GrpcTiers(config.prefill_addresses, config.decode_addresses)
    servicer = GatewayServicer(config, TextTokenizer(config.model_dir), ModelConfig.from_dir(config.model_dir), tiers,
                               GatewayMetrics(registry or CollectorRegistry()))
    server = make_server()
    health = add_health(server)
    gateway_pb2_grpc.add_GatewayServicer_to_server(servicer, server)
    reflection.enable_server_reflection(
        (gateway_pb2.DESCRIPTOR.services_by_name["Gateway"].full_name, reflection.SERVICE_NAME, "grpc.health.v1.Health"),
        server,
    )
    port = bind(server, config.host, config.port)
    server.start()
    set_serving(health, [SERVICE_NAME])
    return RunningGateway(server, port)
