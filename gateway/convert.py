"""GenerateRequest (protobuf) -> GenerationSpec (domain), or InvalidArgument saying what to change."""

import secrets
import uuid
from dataclasses import dataclass

from common.basics.config import GatewayConfig
from common.basics.errors import InvalidArgument
from common.basics.sampling import SamplingConfig
from common.basics.tokenizer import TextTokenizer
from common.edge.proto import sampling_from_proto
from pdserve.v1 import gateway_pb2

CHAT_ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class GenerationSpec:
    request_id: str
    prompt_ids: list[int]
    max_new_tokens: int
    sampling: SamplingConfig
    stop: tuple[str, ...]
    speculative: bool | None = None  # None: the deployment's setting


def spec_from_request(request: gateway_pb2.GenerateRequest, tokenizer: TextTokenizer, config: GatewayConfig,
                      max_context: int, request_id: str | None = None) -> GenerationSpec:
    prompt_ids = _prompt_ids(request, tokenizer)
    room = max_context - len(prompt_ids)
    if room < 1:
        raise InvalidArgument(f"the prompt has {len(prompt_ids)} tokens, which fills the model's context of "
                              f"{max_context}; shorten it")
    if request.HasField("max_new_tokens"):
        max_new = request.max_new_tokens
        if max_new < 1:
            raise InvalidArgument("max_new_tokens must be at least 1")
        if max_new > config.max_new_tokens_limit:
            raise InvalidArgument(f"max_new_tokens {max_new} exceeds this gateway's limit of "
                                  f"{config.max_new_tokens_limit}; lower it")
        if max_new > room:
            raise InvalidArgument(f"the prompt ({len(prompt_ids)} tokens) plus max_new_tokens ({max_new}) exceeds the "
                                  f"model's context of {max_context} tokens; shorten the prompt or lower max_new_tokens")
    else:
        max_new = min(config.default_max_new_tokens, room)
    return GenerationSpec(
        request_id=request.request_id or request_id or uuid.uuid4().hex,
        prompt_ids=prompt_ids,
        max_new_tokens=max_new,
        sampling=_sampling(request),
        stop=_stop_strings(request, config),
        speculative=request.speculative if request.HasField("speculative") else None,
    )


def _prompt_ids(request: gateway_pb2.GenerateRequest, tokenizer: TextTokenizer) -> list[int]:
    kind = request.WhichOneof("input")
    if kind is None:
        raise InvalidArgument("set one of prompt, messages or prompt_token_ids")
    if kind == "prompt":
        if not request.prompt:
            raise InvalidArgument("prompt is empty; send some text")
        ids = tokenizer.encode(request.prompt)
    elif kind == "messages":
        ids = tokenizer.apply_chat_template(_messages(request.messages.messages))
    else:
        ids = list(request.prompt_token_ids.ids)
        bad = [i for i in ids if i >= tokenizer.vocab_size]
        if bad:
            raise InvalidArgument(f"prompt_token_ids {bad[:5]} are outside the vocabulary [0, {tokenizer.vocab_size})")
    if not ids:
        raise InvalidArgument(f"the {kind.replace('_', ' ')} is empty after tokenization; send at least one token")
    return ids


def _messages(messages) -> list[dict[str, str]]:
    if not messages:
        raise InvalidArgument("messages is empty; send at least one chat turn")
    for index, message in enumerate(messages):
        if message.role not in CHAT_ROLES:
            raise InvalidArgument(f"messages[{index}] has role {message.role!r}; use one of {', '.join(CHAT_ROLES)}")
    return [{"role": m.role, "content": m.content} for m in messages]


def _sampling(request: gateway_pb2.GenerateRequest) -> SamplingConfig:
    try:
        config = sampling_from_proto(request.sampling)
    except ValueError as error:
        raise InvalidArgument(f"sampling: {error}") from None
    if request.sampling.HasField("seed"):
        return config
    return SamplingConfig(config.temperature, config.top_p, config.top_k, secrets.randbits(63))


def _stop_strings(request: gateway_pb2.GenerateRequest, config: GatewayConfig) -> tuple[str, ...]:
    if len(request.stop) > config.max_stop_strings:
        raise InvalidArgument(f"{len(request.stop)} stop strings; at most {config.max_stop_strings} are allowed")
    if any(not s for s in request.stop):
        raise InvalidArgument("stop strings must not be empty")
    return tuple(request.stop)
