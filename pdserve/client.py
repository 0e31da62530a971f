"""A typed Python client for the gateway's gRPC API (pdserve.v1.Gateway), used by `pdserve generate` and the bench.

    with Client("127.0.0.1:50051", api_key=KEY) as client:
        for chunk in client.generate("The capital of France is", max_new_tokens=16):
            print(chunk.text, end="")
        done = client.complete(messages=[("user", "Name a prime")], response_format={"regex": r"\\d+"})

Every call has a deadline (timeout_s, for the whole call, retries included). A call the service turns away before
it began (UNAVAILABLE; RESOURCE_EXHAUSTED when it says how long to wait, in grpc-retry-pushback-ms) is sent again
after a backoff, up to `retries` times; a stream is never sent again once a token has arrived (a request that
fails later is the service's to migrate, and the caller's to see)."""

import json
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from common.basics.config import DEFAULT_GATEWAY_PORT
from common.edge.errors import RETRY_PUSHBACK_KEY
from pdserve.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc

FINISH_REASONS = {common_pb2.FINISH_REASON_STOP: "stop", common_pb2.FINISH_REASON_LENGTH: "length",
                  common_pb2.FINISH_REASON_CANCELLED: "cancelled"}
_RETRIED = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED)
_MAX_MESSAGE_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True)
class Logprob:
    """A generated token's log-probability and its top alternatives (token id, log-probability)."""

    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int


@dataclass(frozen=True)
class Chunk:
    """One streamed message: new tokens of completion `index`; the last one of a completion has finish_reason,
    usage and timings."""

    token_ids: list[int]
    text: str
    index: int = 0
    logprobs: list[Logprob] | None = None
    finish_reason: str | None = None
    usage: Usage | None = None
    timings: gateway_pb2.Timings | None = None
    request_id: str = ""


@dataclass
class Completion:
    """A whole completion: every token, the text, why it ended, what it used."""

    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    index: int = 0
    logprobs: list[Logprob] | None = None
    finish_reason: str | None = None
    usage: Usage | None = None
    timings: gateway_pb2.Timings | None = None
    request_id: str = ""


def chunk_of(reply: gateway_pb2.GenerateResponse) -> Chunk:
    logprobs = [Logprob(r.logprob, tuple((a.token_id, a.logprob) for a in r.top)) for r in reply.logprobs] or None
    last = bool(reply.finish_reason)
    usage = Usage(reply.usage.prompt_tokens, reply.usage.completion_tokens, reply.usage.cached_tokens) if last else None
    return Chunk(list(reply.token_ids), reply.text, reply.index, logprobs, FINISH_REASONS.get(reply.finish_reason),
                 usage, reply.timings if last else None, reply.request_id)


def build_request(prompt: str | None = None, *, messages: Iterable[tuple[str, str]] | None = None,
                  token_ids: Sequence[int] | None = None, max_new_tokens: int | None = None,
                  temperature: float | None = None, top_p: float | None = None, top_k: int | None = None,
                  seed: int | None = None, repetition_penalty: float | None = None,
                  presence_penalty: float | None = None, frequency_penalty: float | None = None,
                  min_new_tokens: int | None = None, logprobs: int | None = None, stop: Sequence[str] = (),
                  stop_token_ids: Sequence[int] = (), ignore_eos: bool = False, n: int | None = None,
                  response_format: dict | None = None, speculative: bool | None = None,
                  request_id: str = "") -> gateway_pb2.GenerateRequest:
    """A GenerateRequest from keyword arguments (None: the service's default). response_format: one of
    {"json_schema": dict or JSON text}, {"json_object": True}, {"regex": str}, {"lark": str}."""
    request = gateway_pb2.GenerateRequest(stop=list(stop), stop_token_ids=list(stop_token_ids), ignore_eos=ignore_eos,
                                          request_id=request_id)
    given = [name for name, value in (("prompt", prompt), ("messages", messages), ("token_ids", token_ids))
             if value is not None]
    if len(given) != 1:
        raise ValueError(f"give exactly one of prompt, messages or token_ids (got {given or 'none'})")
    if prompt is not None:
        request.prompt = prompt
    elif messages is not None:
        for role, content in messages:
            request.messages.messages.add(role=role, content=content)
    else:
        request.prompt_token_ids.ids.extend(token_ids)
    for name, value in (("max_new_tokens", max_new_tokens), ("n", n), ("speculative", speculative)):
        if value is not None:
            setattr(request, name, value)
    for name, value in (("temperature", temperature), ("top_p", top_p), ("top_k", top_k), ("seed", seed),
                        ("repetition_penalty", repetition_penalty), ("presence_penalty", presence_penalty),
                        ("frequency_penalty", frequency_penalty), ("min_new_tokens", min_new_tokens),
                        ("logprobs", logprobs)):
        if value is not None:
            setattr(request.sampling, name, value)
    if response_format:
        (kind, spec), = response_format.items()
        if kind == "json_schema" and not isinstance(spec, str):
            spec = json.dumps(spec)
        setattr(request.response_format, kind, spec)
    return request


class Client:
    def __init__(self, address: str = f"127.0.0.1:{DEFAULT_GATEWAY_PORT}", *, api_key: str | None = None,
                 tls_ca: Path | None = None, timeout_s: float = 300.0, retries: int = 3,
                 backoff_s: float = 0.5) -> None:
        """tls_ca: the gateway serves TLS; verify its certificate with this CA (None: plaintext)."""
        options = [("grpc.max_receive_message_length", _MAX_MESSAGE_BYTES)]
        self._channel = grpc.insecure_channel(address, options=options) if tls_ca is None else grpc.secure_channel(
            address, grpc.ssl_channel_credentials(root_certificates=tls_ca.read_bytes()), options=options)
        self.stub = gateway_pb2_grpc.GatewayStub(self._channel)
        self.metadata = (("authorization", f"Bearer {api_key}"),) if api_key else ()
        self.timeout_s, self.retries, self.backoff_s = timeout_s, retries, backoff_s

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *_) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def stream(self, request: gateway_pb2.GenerateRequest, timeout_s: float | None = None,
               retries: int | None = None) -> Iterator[gateway_pb2.GenerateResponse]:
        """Generate's raw messages; sent again (within the deadline) while turned away before the first one."""
        deadline = time.monotonic() + (timeout_s or self.timeout_s)
        for attempt in range(1 + (self.retries if retries is None else retries)):
            started = False
            try:
                for reply in self.stub.Generate(request, timeout=max(deadline - time.monotonic(), 0.001),
                                                metadata=self.metadata):
                    started = True
                    yield reply
                return
            except grpc.RpcError as error:
                if started or not self._wait_to_retry(error, attempt, deadline, retries):
                    raise

    def generate(self, prompt: str | None = None, *, timeout_s: float | None = None, **fields) -> Iterator[Chunk]:
        """Streams the completion(s) of a request: build_request's keyword arguments."""
        for reply in self.stream(build_request(prompt, **fields), timeout_s):
            yield chunk_of(reply)

    def generate_all(self, prompt: str | None = None, *, timeout_s: float | None = None,
                     **fields) -> list[Completion]:
        """Every completion of a request (n of them), whole, in index order."""
        completions: dict[int, Completion] = {}
        for chunk in self.generate(prompt, timeout_s=timeout_s, **fields):
            done = completions.setdefault(chunk.index, Completion(index=chunk.index))
            done.token_ids += chunk.token_ids
            done.text += chunk.text
            if chunk.logprobs is not None:
                done.logprobs = (done.logprobs or []) + chunk.logprobs
            if chunk.finish_reason:
                done.finish_reason, done.usage, done.timings = chunk.finish_reason, chunk.usage, chunk.timings
            done.request_id = chunk.request_id
        return [completions[i] for i in sorted(completions)]

    def complete(self, prompt: str | None = None, *, timeout_s: float | None = None, **fields) -> Completion:
        """One whole completion (the unary Complete call)."""
        reply = self._unary(self.stub.Complete, build_request(prompt, **fields), timeout_s)
        whole = chunk_of(reply)
        return Completion(whole.token_ids, whole.text, whole.index, whole.logprobs, whole.finish_reason, whole.usage,
                          whole.timings, whole.request_id)

    def tokenize(self, prompt: str | None = None, *, messages: Iterable[tuple[str, str]] | None = None,
                 timeout_s: float | None = None) -> list[int]:
        request = gateway_pb2.TokenizeRequest()
        if (prompt is None) == (messages is None):
            raise ValueError("give exactly one of prompt or messages")
        if prompt is not None:
            request.prompt = prompt
        else:
            for role, content in messages:
                request.messages.messages.add(role=role, content=content)
        return list(self._unary(self.stub.Tokenize, request, timeout_s).token_ids)

    def detokenize(self, token_ids: Sequence[int], *, keep_special_tokens: bool = False,
                   timeout_s: float | None = None) -> str:
        request = gateway_pb2.DetokenizeRequest(token_ids=list(token_ids), keep_special_tokens=keep_special_tokens)
        return self._unary(self.stub.Detokenize, request, timeout_s).text

    def model_info(self, timeout_s: float | None = None) -> gateway_pb2.ModelInfo:
        return self._unary(self.stub.GetModelInfo, gateway_pb2.ModelInfoRequest(), timeout_s)

    def _unary(self, call, request, timeout_s: float | None):
        deadline = time.monotonic() + (timeout_s or self.timeout_s)
        for attempt in range(1 + self.retries):
            try:
                return call(request, timeout=max(deadline - time.monotonic(), 0.001), metadata=self.metadata)
            except grpc.RpcError as error:
                if not self._wait_to_retry(error, attempt, deadline, None):
                    raise

    def _wait_to_retry(self, error: grpc.RpcError, attempt: int, deadline: float, retries: int | None) -> bool:
        """Sleeps before the next attempt when the error allows one and time is left; False: give up."""
        if error.code() not in _RETRIED or attempt >= (self.retries if retries is None else retries):
            return False
        pushback = retry_after_s(error)
        if error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and pushback is None:
            return False  # over a limit with no time that would help
        wait = pushback if pushback is not None else self.backoff_s * 2 ** attempt
        if time.monotonic() + wait >= deadline:
            return False
        time.sleep(wait)
        return True


def retry_after_s(error: grpc.RpcError) -> float | None:
    """The delay the service asked for (grpc-retry-pushback-ms), if it asked."""
    trailing = error.trailing_metadata() if hasattr(error, "trailing_metadata") else None
    asked = [int(value) / 1000 for key, value in trailing or () if key == RETRY_PUSHBACK_KEY]
    return asked[0] if asked else None
