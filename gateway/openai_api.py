"""The OpenAI API's shapes, for the gateway's HTTP front (gateway/http_front.py): an OpenAI request body as the
GenerateRequest it asks for (a parameter pdserve does not implement is refused by name, never ignored), and
Generate's replies as OpenAI's completion and chat-completion objects and stream chunks."""

import json
import time
from collections.abc import Callable

from pdserve.v1 import common_pb2, gateway_pb2

# What each endpoint reads. `model` must name the served model; the rest map onto GenerateRequest. pdserve's own
# extensions travel in the body too (the openai client's extra_body): top_k, min_tokens, repetition_penalty,
# ignore_eos, stop_token_ids.
_SAMPLING = {"temperature", "top_p", "top_k", "seed", "presence_penalty", "frequency_penalty", "repetition_penalty",
             "min_tokens"}
_COMMON = {"model", "stream", "stream_options", "stop", "n", "max_tokens", "ignore_eos", "stop_token_ids",
           "response_format", *_SAMPLING}
COMPLETION_FIELDS = _COMMON | {"prompt", "echo", "best_of", "logprobs"}
CHAT_FIELDS = _COMMON | {"messages", "max_completion_tokens", "logprobs", "top_logprobs"}
# OpenAI's default: sampling at temperature 1 (pdserve's gRPC API defaults to greedy).
OPENAI_TEMPERATURE = 1.0
_FINISH = {common_pb2.FINISH_REASON_STOP: "stop", common_pb2.FINISH_REASON_LENGTH: "length",
           common_pb2.FINISH_REASON_CANCELLED: "stop"}


class BadRequest(Exception):
    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


def _refuse_unknown(body: dict, accepted: set[str]) -> None:
    unknown = sorted(set(body) - accepted)
    if unknown:
        raise BadRequest(f"pdserve does not support {', '.join(unknown)}; remove "
                         f"{'it' if len(unknown) == 1 else 'them'} from the request", unknown[0])


def typed(body: dict, name: str, kind, check: Callable | None = None, what: str = ""):
    """body[name], checked to be a `kind` (an integer passes for a float) that `check` accepts; BadRequest naming
    the parameter and saying what it must be, otherwise."""
    value = body[name]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool or check and not check(value):
        raise BadRequest(f"{name} must be {what or kind.__name__}, got {json.dumps(value)}", name)
    return value


def generate_request(body: dict, chat: bool, model_id: str) -> gateway_pb2.GenerateRequest:
    """The GenerateRequest an OpenAI request body asks for; BadRequest names what to change."""
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    _refuse_unknown(body, CHAT_FIELDS if chat else COMPLETION_FIELDS)
    if body.get("model") not in (None, model_id):
        raise BadRequest(f"model {body['model']!r} is not served here; this server serves {model_id!r}", "model")
    request = gateway_pb2.GenerateRequest()
    if chat:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise BadRequest("messages must be a non-empty list of {role, content}", "messages")
        for message in messages:
            request.messages.messages.add(role=_role(message), content=_content(message))
    else:
        _prompt(body.get("prompt"), request)
    if "best_of" in body and typed(body, "best_of", int) != 1:
        raise BadRequest("best_of other than 1 is not supported; send best_of=1 or leave it out", "best_of")
    if body.get("n") is not None:
        request.n = typed(body, "n", int)
    if body.get("echo"):
        raise BadRequest("echo is not supported; leave it out or set it to false", "echo")
    limit = "max_completion_tokens" if chat and "max_completion_tokens" in body else "max_tokens"
    if body.get(limit) is not None:
        request.max_new_tokens = typed(body, limit, int, lambda v: v >= 1, "an integer >= 1")
    elif not chat:
        request.max_new_tokens = 16  # OpenAI's default for completions
    stop = body.get("stop")
    if stop is not None:
        stops = [stop] if isinstance(stop, str) else stop
        if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
            raise BadRequest("stop must be a string or a list of strings", "stop")
        request.stop.extend(stops)
    if body.get("stop_token_ids") is not None:
        ids = typed(body, "stop_token_ids", list, lambda v: all(isinstance(i, int) and i >= 0 for i in v),
                     "a list of token ids")
        request.stop_token_ids.extend(ids)
    if body.get("ignore_eos") is not None:
        request.ignore_eos = typed(body, "ignore_eos", bool)
    _sampling(body, request.sampling)
    _logprobs(body, chat, request.sampling)
    _response_format(body.get("response_format"), request)
    return request


def _response_format(spec, request: gateway_pb2.GenerateRequest) -> None:
    """OpenAI's response_format: {"type": "text"}, {"type": "json_object"}, or {"type": "json_schema",
    "json_schema": {"name": ..., "schema": {...}, "strict": ...}}; pdserve's own {"type": "regex", "regex": ...}
    and {"type": "lark", "lark": ...} as well."""
    if spec is None:
        return
    kind = spec.get("type") if isinstance(spec, dict) else None
    if kind == "text":
        return
    if kind == "json_object":
        request.response_format.json_object = True
    elif kind == "json_schema":
        schema = (spec.get("json_schema") or {}).get("schema")
        if not isinstance(schema, dict):
            raise BadRequest("response_format.json_schema.schema must be a JSON Schema object", "response_format")
        request.response_format.json_schema = json.dumps(schema)
    elif kind in ("regex", "lark") and isinstance(spec.get(kind), str):
        setattr(request.response_format, kind, spec[kind])
    else:
        raise BadRequest("response_format must be {\"type\": \"text\"}, {\"type\": \"json_object\"}, "
                         "{\"type\": \"json_schema\", \"json_schema\": {\"schema\": ...}}, or pdserve's "
                         "{\"type\": \"regex\", \"regex\": ...} / {\"type\": \"lark\", \"lark\": ...}",
                         "response_format")


def _logprobs(body: dict, chat: bool, sampling: common_pb2.SamplingParams) -> None:
    """Chat: `logprobs` (true/false) and `top_logprobs` (alternatives); completions: `logprobs` (alternatives)."""
    if chat:
        wanted = body.get("logprobs") is not None and typed(body, "logprobs", bool)
        if body.get("top_logprobs") is not None:
            if not wanted:
                raise BadRequest("top_logprobs needs logprobs set to true", "top_logprobs")
            sampling.logprobs = typed(body, "top_logprobs", int, lambda v: v >= 0, "an integer >= 0")
        elif wanted:
            sampling.logprobs = 0
    elif body.get("logprobs") is not None:
        sampling.logprobs = typed(body, "logprobs", int, lambda v: v >= 0, "an integer >= 0")


def _role(message) -> str:
    if not isinstance(message, dict) or not isinstance(message.get("role"), str):
        raise BadRequest("each message must be an object with a string role", "messages")
    unknown = set(message) - {"role", "content", "name"}
    if unknown:
        raise BadRequest(f"message fields {sorted(unknown)} are not supported", "messages")
    return message["role"]


def _content(message: dict) -> str:
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" and
                                         isinstance(p.get("text"), str) for p in content):
        return "".join(part["text"] for part in content)
    raise BadRequest("message content must be a string or a list of text parts (no images or audio)", "messages")


def _prompt(prompt, request: gateway_pb2.GenerateRequest) -> None:
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        request.prompt = prompt
    elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) and t >= 0
                                                     for t in prompt):
        request.prompt_token_ids.ids.extend(prompt)
    else:
        raise BadRequest("prompt must be a string or a list of token ids (one prompt per request)", "prompt")


def _sampling(body: dict, sampling: common_pb2.SamplingParams) -> None:
    sampling.temperature = OPENAI_TEMPERATURE
    for name, target, kind in (("temperature", "temperature", float), ("top_p", "top_p", float),
                               ("top_k", "top_k", int), ("seed", "seed", int),
                               ("presence_penalty", "presence_penalty", float),
                               ("frequency_penalty", "frequency_penalty", float),
                               ("repetition_penalty", "repetition_penalty", float),
                               ("min_tokens", "min_new_tokens", int)):
        if body.get(name) is not None:
            value = typed(body, name, kind)
            if kind is int and value < 0:
                raise BadRequest(f"{name} must be >= 0, got {value}", name)
            setattr(sampling, target, value)


def _usage(lasts: list) -> dict:
    """Over a request's completions (their last messages): the prompt counted once."""
    prompt, completion = lasts[0].usage.prompt_tokens, sum(r.usage.completion_tokens for r in lasts)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": lasts[0].usage.cached_tokens}}


def _finish(reply: gateway_pb2.GenerateResponse) -> str | None:
    return _FINISH.get(reply.finish_reason) if reply.finish_reason else None


def _by_index(replies: list) -> list[list]:
    found: dict[int, list] = {}
    for reply in replies:
        found.setdefault(reply.index, []).append(reply)
    return [found[i] for i in sorted(found)]


class CompletionShape:
    """/v1/completions objects: one choice per completion (GenerateResponse.index)."""

    object, chunk_object = "text_completion", "text_completion"

    def __init__(self, model_id: str, tokenizer) -> None:
        self.model_id, self.created, self.tokenizer = model_id, int(time.time()), tokenizer
        self.lasts: dict[int, gateway_pb2.GenerateResponse] = {}  # each completion's last message, when streamed

    def token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id], skip_special_tokens=False)

    def logprobs(self, replies: list) -> dict | None:
        """OpenAI's legacy completions form: tokens, token_logprobs, top_logprobs (token text -> logprob)."""
        pairs = [(t, lp) for r in replies for t, lp in zip(r.token_ids, r.logprobs)]
        if not pairs:
            return None
        return {"tokens": [self.token_text(t) for t, _ in pairs], "token_logprobs": [lp.logprob for _, lp in pairs],
                "top_logprobs": [{self.token_text(a.token_id): a.logprob for a in lp.top} for _, lp in pairs]}

    def _base(self, reply) -> dict:
        return {"id": f"cmpl-{reply.request_id}", "object": self.chunk_object, "created": self.created,
                "model": self.model_id}

    def choice(self, messages: list) -> dict:
        return {"index": messages[-1].index, "text": "".join(r.text for r in messages),
                "logprobs": self.logprobs(messages), "finish_reason": _finish(messages[-1])}

    def whole(self, replies: list) -> dict:
        completions = _by_index(replies)
        return {**self._base(replies[-1]), "object": self.object, "choices": [self.choice(m) for m in completions],
                "usage": _usage([m[-1] for m in completions])}

    def chunk(self, reply) -> dict:
        if reply.finish_reason:
            self.lasts[reply.index] = reply
        return {**self._base(reply), "choices": [self.chunk_choice(reply)]}

    def chunk_choice(self, reply) -> dict:
        return self.choice([reply])

    def usage_chunk(self, last) -> dict:
        lasts = [self.lasts[i] for i in sorted(self.lasts)] or [last]
        return {**self._base(last), "choices": [], "usage": _usage(lasts)}


class ChatShape(CompletionShape):
    """/v1/chat/completions objects."""

    object, chunk_object = "chat.completion", "chat.completion.chunk"

    def __init__(self, model_id: str, tokenizer) -> None:
        super().__init__(model_id, tokenizer)
        self.opened: set[int] = set()  # completions whose first chunk (with the role) went out

    def _base(self, reply) -> dict:
        return {**super()._base(reply), "id": f"chatcmpl-{reply.request_id}"}

    def logprobs(self, replies: list) -> dict | None:
        """OpenAI's chat form: content, one entry per token with its text, bytes and top alternatives."""
        pairs = [(t, lp) for r in replies for t, lp in zip(r.token_ids, r.logprobs)]
        if not pairs:
            return None

        def entry(token_id: int, logprob: float) -> dict:
            text = self.token_text(token_id)
            return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

        return {"content": [{**entry(t, lp.logprob), "top_logprobs": [entry(a.token_id, a.logprob) for a in lp.top]}
                            for t, lp in pairs]}

    def choice(self, messages: list) -> dict:
        message = {"role": "assistant", "content": "".join(r.text for r in messages)}
        return {"index": messages[-1].index, "message": message, "logprobs": self.logprobs(messages),
                "finish_reason": _finish(messages[-1])}

    def chunk_choice(self, reply) -> dict:
        delta = {"content": reply.text} if reply.text or not reply.finish_reason else {}
        if reply.index not in self.opened:
            self.opened.add(reply.index)
            delta = {"role": "assistant", **delta}
        return {"index": reply.index, "delta": delta, "logprobs": self.logprobs([reply]),
                "finish_reason": _finish(reply)}
