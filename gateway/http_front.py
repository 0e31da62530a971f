"""The OpenAI-compatible HTTP front of the gateway (its own port; off unless --http-port is given):
POST /v1/completions, POST /v1/chat/completions (server-sent events when `stream` is true) and GET /v1/models.

Each HTTP request becomes a GenerateRequest served by the gateway's own servicer in this process, through a
call context that carries the HTTP headers as gRPC metadata: the API key (`Authorization: Bearer`), the
request id (`x-request-id`) and the trace context (`traceparent`). So validation, keys and their limits,
admission, tracing and metrics are the gRPC edge's, and a gRPC status becomes its HTTP status with OpenAI's error
body. A parameter pdserve does not implement is refused by name (400), never ignored.

Built on Starlette, served by uvicorn in a thread of the gateway process."""

import asyncio
import json
import threading
import time
from collections import namedtuple
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import uvicorn
from starlette.applications import Starlette
from starlette.concurrency import iterate_in_threadpool, run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from common.edge.errors import RETRY_PUSHBACK_KEY
from gateway.openai_api import (
    BadRequest,
    ChatShape,
    CompletionShape,
    generate_request,
    typed,
)
from pdserve.v1 import gateway_pb2

_HTTP_STATUS = {grpc.StatusCode.INVALID_ARGUMENT: 400, grpc.StatusCode.FAILED_PRECONDITION: 400,
                grpc.StatusCode.OUT_OF_RANGE: 400, grpc.StatusCode.UNAUTHENTICATED: 401,
                grpc.StatusCode.PERMISSION_DENIED: 403, grpc.StatusCode.NOT_FOUND: 404,
                grpc.StatusCode.ABORTED: 409, grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
                grpc.StatusCode.CANCELLED: 499, grpc.StatusCode.UNAVAILABLE: 503,
                grpc.StatusCode.DEADLINE_EXCEEDED: 504}
_ERROR_TYPE = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 429: "rate_limit_error"}
_Metadatum = namedtuple("_Metadatum", ["key", "value"])
_FORWARDED_HEADERS = ("authorization", "x-request-id", "traceparent", "tracestate")
_DISCONNECT_POLL_S = 0.5  # how often a non-streamed call checks that its client is still there
_CLOSE_WAIT_S = 30.0


class CallFailed(Exception):
    """A servicer ended the call with a status (what grpc's context.abort does on the wire)."""

    def __init__(self, code: grpc.StatusCode, details: str, retry_after_ms: str | None = None) -> None:
        super().__init__(details)
        self.code, self.details, self.retry_after_ms = code, details, retry_after_ms


class HttpCallContext:
    """The part of grpc.ServicerContext the gateway's servicer uses, for a call that arrived over HTTP."""

    def __init__(self, headers) -> None:
        self._metadata = tuple(_Metadatum(key, headers[key]) for key in _FORWARDED_HEADERS if key in headers)
        self._callbacks: list[Callable[[], None]] = []
        self._trailing: dict[str, str] = {}
        self._lock = threading.Lock()
        self.active = True

    def invocation_metadata(self):
        return self._metadata

    def time_remaining(self) -> None:
        return None  # an HTTP caller's deadline is its own timeout: the gateway sees none

    def add_callback(self, callback: Callable[[], None]) -> bool:
        with self._lock:
            self._callbacks.append(callback)
        return True

    def is_active(self) -> bool:
        return self.active

    def set_trailing_metadata(self, metadata) -> None:
        self._trailing.update(metadata)

    def abort(self, code: grpc.StatusCode, details: str):
        raise CallFailed(code, details, self._trailing.get(RETRY_PUSHBACK_KEY))

    def end(self) -> None:
        """The HTTP exchange is over (finished, failed or the client went away): what the call holds is freed."""
        with self._lock:
            self.active, callbacks, self._callbacks = False, self._callbacks, []
        for callback in callbacks:
            callback()


def error_response(status: int, message: str, param: str | None = None, retry_after_ms: str | None = None,
                   code: str | None = None) -> JSONResponse:
    headers = {"retry-after": str(max(1, -(-int(retry_after_ms) // 1000)))} if retry_after_ms else None
    body = {"error": {"message": message, "type": _ERROR_TYPE.get(status, "server_error"), "param": param,
                      "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


def failed(error: CallFailed) -> JSONResponse:
    return error_response(_HTTP_STATUS.get(error.code, 500), error.details, retry_after_ms=error.retry_after_ms,
                          code=error.code.name.lower())


class OpenAIFront:
    """The routes, over a gateway servicer (gateway/server.py)."""

    def __init__(self, servicer, model_id: str) -> None:
        self.servicer = servicer
        self.model_id = model_id
        self.created = int(time.time())
        self.app = Starlette(routes=[
            Route("/v1/completions", self.completions, methods=["POST"]),
            Route("/v1/chat/completions", self.chat_completions, methods=["POST"]),
            Route("/v1/models", self.models, methods=["GET"]),
        ])

    async def models(self, request: Request) -> Response:
        context = HttpCallContext(request.headers)
        try:
            await run_in_threadpool(self.servicer.GetModelInfo, gateway_pb2.ModelInfoRequest(), context)
        except CallFailed as error:
            return failed(error)
        return JSONResponse({"object": "list", "data": [
            {"id": self.model_id, "object": "model", "created": self.created, "owned_by": "pdserve"}]})

    async def completions(self, request: Request) -> Response:
        return await self._generate(request, chat=False)

    async def chat_completions(self, request: Request) -> Response:
        return await self._generate(request, chat=True)

    async def _generate(self, request: Request, chat: bool) -> Response:
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            return error_response(400, f"the request body is not JSON: {error}")
        try:
            generate = generate_request(body, chat, self.model_id)
            stream = body.get("stream") is not None and typed(body, "stream", bool)
            usage_in_stream = bool((body.get("stream_options") or {}).get("include_usage"))
        except BadRequest as error:
            return error_response(400, str(error), error.param)
        shape = (ChatShape if chat else CompletionShape)(self.model_id, self.servicer.tokenizer)
        context = HttpCallContext(request.headers)
        replies = self.servicer.Generate(generate, context)
        if not stream:
            try:
                whole = await _unless_disconnected(request, context, run_in_threadpool(lambda: list(replies)))
            except CallFailed as error:
                return failed(error)
            finally:
                await _finish_call(context, replies)
            return JSONResponse(shape.whole(whole))
        try:  # the first reply decides the status: a refusal before any token is an HTTP error
            first = await run_in_threadpool(next, replies, None)
        except CallFailed as error:
            await _finish_call(context, replies)
            return failed(error)
        return _CallStream(self._events(shape, first, replies, usage_in_stream), context, replies)

    async def _events(self, shape, first, replies: Iterator, usage_in_stream: bool):
        try:
            last = first
            if first is not None:
                yield _sse(shape.chunk(first))
                async for reply in iterate_in_threadpool(replies):
                    last = reply
                    yield _sse(shape.chunk(reply))
            if usage_in_stream and last is not None:
                yield _sse(shape.usage_chunk(last))
            yield "data: [DONE]\n\n"
        except CallFailed as error:
            yield _sse({"error": {"message": error.details, "type": "server_error", "param": None,
                                  "code": error.code.name.lower()}})


class _CallStream(StreamingResponse):
    """Server-sent events of one call; however the exchange ends (done, failed, or the client gone mid-stream),
    the call is cancelled and its generator closed, so the request frees what it holds at once."""

    def __init__(self, events, context: HttpCallContext, replies: Iterator) -> None:
        super().__init__(events, media_type="text/event-stream", headers={"cache-control": "no-cache"})
        self._context, self._replies = context, replies

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await _finish_call(self._context, self._replies)


async def _unless_disconnected(request: Request, context: HttpCallContext, work):
    """Awaits `work`, cancelling the call (context.end) if the client goes away first."""
    task = asyncio.ensure_future(work)
    while not task.done():
        await asyncio.wait({task}, timeout=_DISCONNECT_POLL_S)
        if not task.done() and await request.is_disconnected():
            context.end()
    return task.result()


async def _finish_call(context: HttpCallContext, replies: Iterator) -> None:
    """Cancels the call and closes its generator (the servicer's cleanup runs: the request is counted, its key
    released). A generator still inside next() on a worker thread returns soon after the cancel; wait for it."""
    context.end()
    for _ in range(int(_CLOSE_WAIT_S / 0.01)):
        try:
            replies.close()
            return
        except ValueError:  # "generator already executing"
            await asyncio.sleep(0.01)


def _sse(event: dict) -> str:
    return f"data: {json.dumps(event, ensure_ascii=False)}\n\n"


class HttpServer:
    """uvicorn serving the front in a thread; stop() ends it."""

    def __init__(self, app, host: str, port: int, tls_cert: Path | None = None, tls_key: Path | None = None) -> None:
        """Over TLS when given the public certificate and key (--public-tls-cert/--public-tls-key)."""
        self._server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="off",
                                                     access_log=False, ssl_certfile=tls_cert, ssl_keyfile=tls_key))
        self._thread = threading.Thread(target=self._server.run, name="http-front", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the HTTP front did not start on {host}:{port}")
            time.sleep(0.02)
        self.port = self._server.servers[0].sockets[0].getsockname()[1]

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=10)
