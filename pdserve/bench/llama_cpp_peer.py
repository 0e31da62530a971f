"""The `llama.cpp` peer: llama-cpp-python on the default model's GGUF file itself, served as a
pdserve.v1.Gateway for the load generator. llama.cpp's Python API runs one sequence at a time, so requests
are served one after another (a lock), as its own Python server does. Greedy (top_k 1, temperature 0).
Only runs where llama-cpp-python is installed (it compiles llama.cpp from source); the harness skips it
otherwise.

    python -m pdserve.bench.llama_cpp_peer --gguf FILE --port N [--threads 2]
"""

import argparse
import os
import threading
import time

import grpc
from llama_cpp import Llama

from common.edge.server import (
    add_health,
    bind,
    make_server,
    set_serving,
    wait_for_signal,
)
from pdserve.bench.replies import last_reply
from pdserve.v1 import (
    common_pb2,
    decode_pb2,
    decode_pb2_grpc,
    gateway_pb2,
    gateway_pb2_grpc,
)


class LlamaCppGateway(gateway_pb2_grpc.GatewayServicer):
    def __init__(self, llm: Llama) -> None:
        self.llm = llm
        self.lock = threading.Lock()
        self.running = 0

    def Generate(self, request, context):
        if request.WhichOneof("input") != "prompt_token_ids" or not request.prompt_token_ids.ids:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the llama.cpp peer takes prompt_token_ids only")
        arrived = time.monotonic()
        max_new = request.max_new_tokens or 256
        eos = self.llm.token_eos()
        num, reason, first_at = 0, common_pb2.FINISH_REASON_LENGTH, None
        with self.lock:
            self.running = 1
            try:
                for token in self.llm.generate(list(request.prompt_token_ids.ids), top_k=1, top_p=1.0, temp=0.0,
                                               repeat_penalty=1.0, reset=True):
                    num, first_at = num + 1, first_at or time.monotonic()
                    yield gateway_pb2.GenerateResponse(token_ids=[token], request_id=request.request_id)
                    if token == eos:
                        reason = common_pb2.FINISH_REASON_STOP
                    if token == eos or num >= max_new or not context.is_active():
                        break
            finally:
                self.running = 0
        yield last_reply(request_id=request.request_id, finish_reason=reason,
                         prompt_tokens=len(request.prompt_token_ids.ids), completion_tokens=num, arrived=arrived,
                         first_at=first_at)


class LlamaCppStats(decode_pb2_grpc.DecodeServicer):
    def __init__(self, gateway: LlamaCppGateway) -> None:
        self.gateway = gateway

    def Stats(self, request, context):
        return decode_pb2.DecodeStats(num_running=self.gateway.running)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pdserve.bench.llama_cpp_peer")
    parser.add_argument("--gguf", required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--threads", type=int, default=0, help="0: every core this process may use")
    parser.add_argument("--context", type=int, default=2048)
    args = parser.parse_args(argv)
    threads = args.threads or len(os.sched_getaffinity(0))
    llm = Llama(model_path=args.gguf, n_ctx=args.context, n_threads=threads, n_batch=512, verbose=False)
    gateway = LlamaCppGateway(llm)
    server = make_server(4 * 2**20, max_workers=64)  # token-id requests
    health = add_health(server)
    gateway_pb2_grpc.add_GatewayServicer_to_server(gateway, server)
    decode_pb2_grpc.add_DecodeServicer_to_server(LlamaCppStats(gateway), server)
    port = bind(server, args.host, args.port)
    server.start()
    set_serving(health, ["pdserve.v1.Gateway"])
    print(f"llama.cpp peer serving on port {port}", flush=True)
    wait_for_signal()
    server.stop(2.0).wait()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
