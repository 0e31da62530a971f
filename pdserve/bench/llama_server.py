"""The `llama-server` peer: llama.cpp's own HTTP server, the strongest CPU peer a user would pick. It batches
continuously over `-np` slots; the load generator talks to it straight over HTTP (no wrapper process between
them), sending each prompt as token ids to /completion and reading the streamed tokens back.

The binary is found at $PDSERVE_LLAMA_SERVER, on PATH, or where `make llama-server`
(scripts/bench/build-llama-server) builds it: $XDG_CACHE_HOME/pdserve/llama.cpp/bin (default ~/.cache/pdserve/...).
"""

import http.client
import json
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

from common.basics.config import cache_root
from pdserve.v1 import common_pb2, gateway_pb2

SCHEME = "http://"  # a gateway address with this prefix is a llama-server, not a pdserve.v1.Gateway
_STOP_TYPES = {"eos": common_pb2.FINISH_REASON_STOP, "word": common_pb2.FINISH_REASON_STOP,
               "limit": common_pb2.FINISH_REASON_LENGTH}


def find_llama_server() -> Path | None:
    """The llama-server binary: $PDSERVE_LLAMA_SERVER, then PATH, then the build cache; None when absent."""
    named = os.environ.get("PDSERVE_LLAMA_SERVER")
    if named:
        return Path(named) if Path(named).is_file() else None
    on_path = shutil.which("llama-server")
    if on_path:
        return Path(on_path)
    built = cache_root(os.environ.get("XDG_CACHE_HOME"), os.path.expanduser("~")) / "llama.cpp" / "bin" / "llama-server"
    return built if built.is_file() else None


def server_command(binary: Path, gguf: Path, host: str, port: int, threads: int, slots: int,
                   context_per_slot: int) -> list[str]:
    """llama-server on the GGUF file: `slots` sequences batched continuously, each with its own context."""
    command = [str(binary), "--model", str(gguf), "--host", host, "--port", str(port),
               "--parallel", str(slots), "--ctx-size", str(slots * context_per_slot), "--cont-batching",
               "--no-webui", "--log-disable"]
    if threads:
        command += ["--threads", str(threads), "--threads-batch", str(threads)]
    return command


def is_ready(address: str, timeout_s: float = 2.0) -> bool:
    """Whether llama-server at http://host:port answers /health with 200 (the model is loaded)."""
    host, port = _host_port(address)
    connection = http.client.HTTPConnection(host, port, timeout=timeout_s)
    try:
        connection.request("GET", "/health")
        return connection.getresponse().status == 200
    except OSError:
        return False
    finally:
        connection.close()


class LlamaServerError(Exception):
    """A request llama-server failed: `code` names it the way a gRPC status would (for the bench's counts)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code_name = code


class LlamaServerClient:
    """What the load generator needs of pdserve.client.Client (`stream`, `close`), over llama-server's HTTP
    API: each streamed event becomes a GenerateResponse with its new token ids; the last carries the finish
    reason and usage. Greedy (temperature 0, top_k 1), with `cache_prompt` on: llama-server reuses a slot's KV
    for a later prompt with the same prefix, as pdserve's prefix cache does."""

    def __init__(self, address: str) -> None:
        self.host, self.port = _host_port(address)

    def close(self) -> None:
        pass

    def stream(self, request: gateway_pb2.GenerateRequest, timeout_s: float | None = None,
               retries: int | None = None) -> Iterator[gateway_pb2.GenerateResponse]:
        if request.WhichOneof("input") != "prompt_token_ids":
            raise ValueError("the llama-server peer takes prompt_token_ids only")
        body = {"prompt": list(request.prompt_token_ids.ids), "n_predict": request.max_new_tokens or 256,
                "temperature": 0.0, "top_k": 1, "stream": True, "return_tokens": True, "cache_prompt": True,
                "ignore_eos": request.ignore_eos}
        connection = http.client.HTTPConnection(self.host, self.port, timeout=timeout_s)
        deadline = time.monotonic() + (timeout_s or 3600.0)
        try:
            connection.request("POST", "/completion", json.dumps(body), {"Content-Type": "application/json"})
            response = connection.getresponse()
            if response.status != 200:
                raise LlamaServerError("UNAVAILABLE" if response.status == 503 else "INTERNAL",
                                       f"llama-server answered {response.status}: {response.read()[:200]!r}")
            yield from _events(response, request.request_id, deadline)
        except TimeoutError as error:
            raise LlamaServerError("DEADLINE_EXCEEDED", str(error)) from error
        except OSError as error:
            raise LlamaServerError("UNAVAILABLE", str(error)) from error
        finally:
            connection.close()


def _events(response, request_id: str, deadline: float) -> Iterator[gateway_pb2.GenerateResponse]:
    for raw in response:
        if time.monotonic() > deadline:
            raise LlamaServerError("DEADLINE_EXCEEDED", "the bench's deadline passed mid-stream")
        line = raw.strip()
        if not line.startswith(b"data: "):
            continue
        event = json.loads(line[len(b"data: "):])
        reply = gateway_pb2.GenerateResponse(token_ids=event.get("tokens", []), request_id=request_id)
        if event.get("stop"):
            reply.finish_reason = _STOP_TYPES.get(event.get("stop_type"), common_pb2.FINISH_REASON_STOP)
            reply.usage.prompt_tokens = event.get("tokens_evaluated", 0)
            reply.usage.completion_tokens = event.get("tokens_predicted", 0)
            timings = event.get("timings", {})
            reply.usage.cached_tokens = timings.get("cache_n", 0)  # prompt tokens its slot's cache held
            reply.timings.prefill_ms = timings.get("prompt_ms", 0.0)
            yield reply
            return
        yield reply


def _host_port(address: str) -> tuple[str, int]:
    parts = urlsplit(address if address.startswith(SCHEME) else SCHEME + address)
    return parts.hostname or "127.0.0.1", parts.port or 80
