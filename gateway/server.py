"""The gateway service edge: validate and tokenize, run the Generation, stream text back."""

import time
from dataclasses import dataclass

import grpc
from grpc_reflection.v1alpha import reflection

from common.config import GatewayConfig
from common.grpc_util import (REQUEST_ID_KEY, add_health, make_channel, make_server, maps_errors, metadata_value,
                              set_serving, time_remaining_s)
from common.model.config import ModelConfig
from common.proto_convert import FINISH_REASONS
from common.tier import bind
from common.tokenizer import TextTokenizer
from common.tracing import incoming_context, outgoing_metadata, tracer
from gateway.generation import Generation, Stubs, TierError
from gateway.router import Router
from gateway.text_stream import TextStream
from gateway.validation import spec_from_request
from pdserve.v1 import decode_pb2_grpc, gateway_pb2, gateway_pb2_grpc, prefill_pb2_grpc

SERVICE_NAME = "pdserve.v1.Gateway"


class GatewayServicer(gateway_pb2_grpc.GatewayServicer):
    def __init__(self, config: GatewayConfig, tokenizer: TextTokenizer, model: ModelConfig, stubs: Stubs) -> None:
        self.config = config
        self.tokenizer = tokenizer
        self.model = model
        self.stubs = stubs
        self.router = Router(config.prefill_addresses, config.decode_addresses)
        self._tracer = tracer("pdserve.gateway")

    @maps_errors
    def Generate(self, request, context):
        arrived = time.monotonic()
        with self._tracer.start_as_current_span("gateway.generate", context=incoming_context(context)) as span:
            with self._tracer.start_as_current_span("gateway.tokenize"):
                spec = spec_from_request(request, self.tokenizer, self.config, self.model.max_position_embeddings,
                                         metadata_value(context, REQUEST_ID_KEY))
            span.set_attribute("gen_ai.request.id", spec.request_id)
            span.set_attribute("gen_ai.usage.input_tokens", len(spec.prompt_ids))
            remaining = time_remaining_s(context)
            generation = Generation(
                spec, self.router, self.stubs, eos_token_ids=frozenset(self.model.eos_token_ids),
                lease_ms=self.config.lease_ms, deadline=arrived + remaining if remaining is not None else None,
                metadata=outgoing_metadata(spec.request_id),
            )
            context.add_callback(generation.cancel)
            text = TextStream(self.tokenizer, spec.stop)
            num_generated, first_at = 0, None
            try:
                for event in generation.run():
                    num_generated += len(event.token_ids)
                    first_at = first_at or time.monotonic()
                    delta = text.push(event.token_ids)
                    reason = "stop" if text.stopped else event.finish_reason
                    if reason is None:
                        yield gateway_pb2.GenerateResponse(token_ids=event.token_ids, text=delta,
                                                           request_id=spec.request_id)
                        continue
                    generation.cancel()
                    span.set_attribute("gen_ai.usage.output_tokens", num_generated)
                    span.set_attribute("gen_ai.response.finish_reasons", [reason])
                    yield gateway_pb2.GenerateResponse(
                        token_ids=event.token_ids, text=delta + text.finish(), finish_reason=FINISH_REASONS[reason],
                        request_id=spec.request_id,
                        usage=gateway_pb2.Usage(prompt_tokens=len(spec.prompt_ids), completion_tokens=num_generated),
                        timings=self._timings(generation, arrived, first_at),
                    )
                    return
            except TierError as error:
                if context.is_active():
                    context.abort(error.code, str(error))

    @staticmethod
    def _timings(generation: Generation, arrived: float, first_at: float) -> gateway_pb2.Timings:
        now = time.monotonic()
        return gateway_pb2.Timings(
            queue_ms=generation.timings.queue_ms,
            prefill_ms=generation.timings.prefill_ms,
            kv_transfer_ms=generation.timings.kv_transfer_ms,
            time_to_first_token_ms=(first_at - arrived) * 1000,
            decode_ms=(now - first_at) * 1000,
            total_ms=(now - arrived) * 1000,
        )


@dataclass
class RunningGateway:
    server: grpc.Server
    port: int

    def stop(self, grace_s: float = 2.0) -> None:
        self.server.stop(grace_s).wait()


def start_gateway(config: GatewayConfig) -> RunningGateway:
    stubs = Stubs(
        prefill={a: prefill_pb2_grpc.PrefillStub(make_channel(a)) for a in config.prefill_addresses},
        decode={a: decode_pb2_grpc.DecodeStub(make_channel(a)) for a in config.decode_addresses},
    )
    servicer = GatewayServicer(config, TextTokenizer(config.model_dir), ModelConfig.from_dir(config.model_dir), stubs)
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
