"""Protobuf <-> domain objects for the gateway, and nothing protobuf beyond this module and the gRPC tier client:
GenerateRequest -> GenerationSpec (or InvalidArgument saying what to change), the calls to the tiers and their
replies, and the GenerateResponse messages streamed back."""

import secrets
import uuid
from dataclasses import replace

from common.basics.config import GatewayConfig
from common.basics.errors import InvalidArgument
from common.basics.grammar import GrammarError, ModelGrammars, grammar_of
from common.basics.request_id import checked_request_id
from common.basics.sampling import SamplingConfig, TokenLogprob
from common.basics.tokenizer import TextTokenizer
from common.edge.proto import (
    FINISH_REASONS,
    logprob_from_proto,
    logprob_to_proto,
    sampling_from_proto,
    sampling_to_proto,
)
from gateway.tiers import (
    CacheSummary,
    DecodeArgs,
    DecodeChunk,
    GenerationSpec,
    PrefillResult,
    Reservation,
    SpeculationCounts,
)
from pdserve.v1 import common_pb2, decode_pb2, gateway_pb2, prefill_pb2

FINISH_REASON_NAMES = {number: name for name, number in FINISH_REASONS.items()}
CHAT_ROLES = ("system", "user", "assistant")


def spec_from_request(request: gateway_pb2.GenerateRequest, tokenizer: TextTokenizer, config: GatewayConfig,
                      max_context: int, request_id: str | None = None) -> GenerationSpec:
    request_id = _request_id(request.request_id or request_id)
    _check_text_size(request, tokenizer, max_context)
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
    sampling = _sampling(request)
    n = request.n if request.HasField("n") else 1
    if not 1 <= n <= config.max_completions:
        raise InvalidArgument(f"n must be in [1, {config.max_completions}] (this gateway's limit), got {n}")
    if sampling.logprobs is not None and sampling.logprobs > config.max_logprobs:
        raise InvalidArgument(f"sampling.logprobs {sampling.logprobs} exceeds this gateway's limit of "
                              f"{config.max_logprobs} alternatives per token; lower it")
    if sampling.min_new_tokens > max_new:
        raise InvalidArgument(f"sampling.min_new_tokens {sampling.min_new_tokens} exceeds max_new_tokens {max_new}; "
                              "lower it")
    return GenerationSpec(
        request_id=request_id,
        prompt_ids=prompt_ids,
        max_new_tokens=max_new,
        sampling=sampling,
        stop=_stop_strings(request, config),
        speculative=request.speculative if request.HasField("speculative") else None,
        stop_token_ids=_stop_token_ids(request, tokenizer, config),
        ignore_eos=request.ignore_eos,
        n=n,
    )


def with_response_format(spec: GenerationSpec, request: gateway_pb2.GenerateRequest,
                         grammars: ModelGrammars) -> GenerationSpec:
    """The spec with the request's response format as the grammar its tokens must follow (checked against the
    model's tokenizer here, so a bad format never reaches a tier); any grammar a caller put in sampling is dropped."""
    kind = request.response_format.WhichOneof("format") if request.HasField("response_format") else None
    grammar = ""
    if kind is not None:
        try:
            grammar = grammar_of(kind, getattr(request.response_format, kind))
            grammars.check(grammar)
        except GrammarError as error:
            raise InvalidArgument(f"response_format.{kind}: {error}") from None
    return replace(spec, sampling=replace(spec.sampling, grammar=grammar))


def tokenized(request: gateway_pb2.TokenizeRequest, tokenizer: TextTokenizer,
              max_context: int) -> gateway_pb2.TokenizeResponse:
    if request.WhichOneof("input") is None:
        raise InvalidArgument("set one of prompt or messages")
    _check_text_size(request, tokenizer, max_context)
    return gateway_pb2.TokenizeResponse(token_ids=_prompt_ids(request, tokenizer), max_context=max_context)


def detokenized(request: gateway_pb2.DetokenizeRequest, tokenizer: TextTokenizer,
                max_context: int) -> gateway_pb2.DetokenizeResponse:
    if len(request.token_ids) > max_context:
        raise InvalidArgument(f"{len(request.token_ids)} token ids; at most the model's context of {max_context}")
    _check_vocabulary("token_ids", request.token_ids, tokenizer)
    text = tokenizer.decode(list(request.token_ids), skip_special_tokens=not request.keep_special_tokens)
    return gateway_pb2.DetokenizeResponse(text=text)


def completed(replies: list[gateway_pb2.GenerateResponse]) -> gateway_pb2.GenerateResponse:
    """Generate's stream (of one completion) as one reply: every token id and the whole text, with the last
    message's fields."""
    whole = gateway_pb2.GenerateResponse()
    whole.CopyFrom(replies[-1])
    whole.ClearField("token_ids")
    whole.token_ids.extend(i for reply in replies for i in reply.token_ids)
    whole.ClearField("logprobs")
    whole.logprobs.extend(r for reply in replies for r in reply.logprobs)
    whole.text = "".join(reply.text for reply in replies)
    return whole


def _request_id(given: str | None) -> str:
    """The caller's id (checked: it travels in metadata and traces), or one is made."""
    return checked_request_id(given) if given else uuid.uuid4().hex


def _check_text_size(request: gateway_pb2.GenerateRequest, tokenizer: TextTokenizer, max_context: int) -> None:
    """Refuses text that cannot fit the context before paying to tokenize it: a token stands for at most
    max_token_bytes bytes, so B bytes are at least B / max_token_bytes tokens."""
    kind = request.WhichOneof("input")
    if kind == "prompt":
        size = len(request.prompt.encode())
    elif kind == "messages":
        size = sum(len(m.content.encode()) + len(m.role.encode()) for m in request.messages.messages)
    else:
        return
    least_tokens = -(-size // tokenizer.max_token_bytes)
    if least_tokens > max_context:
        raise InvalidArgument(f"the {kind} is {size} bytes: at least {least_tokens} tokens, more than the model's "
                              f"context of {max_context}; shorten it")


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
        _check_vocabulary("prompt_token_ids", ids, tokenizer)
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
    config = replace(config, suppress_token_ids=frozenset())  # the gateway's to set (GenerationSpec.with_stops)
    if request.sampling.HasField("seed"):
        return config
    return replace(config, seed=secrets.randbits(63))


def _stop_token_ids(request: gateway_pb2.GenerateRequest, tokenizer: TextTokenizer,
                    config: GatewayConfig) -> frozenset[int]:
    if len(request.stop_token_ids) > config.max_stop_strings:
        raise InvalidArgument(f"{len(request.stop_token_ids)} stop_token_ids; at most {config.max_stop_strings} "
                              "are allowed")
    _check_vocabulary("stop_token_ids", request.stop_token_ids, tokenizer)
    return frozenset(request.stop_token_ids)


def _check_vocabulary(field: str, ids, tokenizer: TextTokenizer) -> None:
    bad = [i for i in ids if i >= tokenizer.vocab_size]
    if bad:
        raise InvalidArgument(f"{field} {bad[:5]} are outside the vocabulary [0, {tokenizer.vocab_size})")


def _stop_strings(request: gateway_pb2.GenerateRequest, config: GatewayConfig) -> tuple[str, ...]:
    if len(request.stop) > config.max_stop_strings:
        raise InvalidArgument(f"{len(request.stop)} stop strings; at most {config.max_stop_strings} are allowed")
    if any(not s for s in request.stop):
        raise InvalidArgument("stop strings must not be empty")
    return tuple(request.stop)


# The calls to the tiers, and their replies.

def reserve_request(request_id: str, prompt_ids: list[int], max_new_tokens: int,
                    lease_ms: int) -> decode_pb2.ReserveRequest:
    return decode_pb2.ReserveRequest(request_id=request_id, num_prompt_tokens=len(prompt_ids),
                                     max_new_tokens=max_new_tokens, lease_ms=lease_ms, prompt_token_ids=prompt_ids)


def reservation(reply: decode_pb2.ReserveResponse) -> Reservation:
    return Reservation(reply.handle, reply.num_cached_tokens)


def prefill_request(request_id: str, prompt_ids: list[int], sampling: SamplingConfig, decode_address: str,
                    handle: str, first_step: int, kv_skip_tokens: int) -> prefill_pb2.PrefillRequest:
    return prefill_pb2.PrefillRequest(request_id=request_id, prompt_token_ids=prompt_ids,
                                      sampling=sampling_to_proto(sampling), decode_address=decode_address,
                                      kv_handle=handle, first_step=first_step, kv_skip_tokens=kv_skip_tokens)


def prefill_result(reply: prefill_pb2.PrefillResponse) -> PrefillResult:
    logprob = logprob_from_proto(reply.first_token_logprob) if reply.HasField("first_token_logprob") else None
    return PrefillResult(reply.first_token_id, reply.queue_ms, reply.compute_ms, reply.kv_transfer_ms,
                         reply.kv_bytes, reply.num_chunks, reply.num_cached_tokens, logprob)


def cache_summary(reply: common_pb2.CacheSummary) -> CacheSummary:
    return CacheSummary(reply.fingerprint, reply.block_size, reply.version,
                        None if reply.unchanged else frozenset(reply.block_hashes), reply.num_blocks_total,
                        reply.num_blocks_free, reply.num_requests, reply.num_queued_tokens, reply.prefix_caching,
                        reply.weight_format, reply.kv_dtype)


def decode_request(request_id: str, args: DecodeArgs) -> decode_pb2.DecodeRequest:
    return decode_pb2.DecodeRequest(
        handle=args.handle, request_id=request_id, first_token_id=args.first_token,
        max_new_tokens=args.max_new_tokens, sampling=sampling_to_proto(args.sampling),
        stop_token_ids=sorted(args.stop_token_ids), stop=args.stop, prompt_token_ids=args.prompt_ids,
        speculative=args.speculative, first_step=args.first_step, prefill_locally=args.prefill_locally,
    )


def decode_chunk(reply: decode_pb2.DecodeResponse) -> DecodeChunk:
    speculation = None
    if reply.HasField("speculation"):
        s = reply.speculation
        speculation = SpeculationCounts(s.num_proposed, s.num_accepted, s.num_verify_steps, s.num_verify_tokens)
    logprobs = [logprob_from_proto(r) for r in reply.logprobs] if reply.logprobs else None
    return DecodeChunk(list(reply.token_ids), FINISH_REASON_NAMES.get(reply.finish_reason), speculation,
                       reply.local_prefill_ms, logprobs)


# What the client receives.

def token_reply(token_ids: list[int], text: str, request_id: str, logprobs: list[TokenLogprob] | None = None,
                index: int = 0) -> gateway_pb2.GenerateResponse:
    return gateway_pb2.GenerateResponse(token_ids=token_ids, text=text, request_id=request_id,
                                        logprobs=[logprob_to_proto(r) for r in logprobs or ()], index=index)


def last_reply(token_ids: list[int], text: str, request_id: str, reason: str, prompt_tokens: int,
               completion_tokens: int, timings: dict, speculation: SpeculationCounts | None,
               num_migrations: int, cached_tokens: int = 0, logprobs: list[TokenLogprob] | None = None,
               index: int = 0) -> gateway_pb2.GenerateResponse:
    """The final message: finish reason, usage, timings (by Timings field: milliseconds, the prefill path and the
    KV bytes pushed), speculation, and how often the request moved to another decode instance."""
    return gateway_pb2.GenerateResponse(
        token_ids=token_ids, text=text, finish_reason=FINISH_REASONS[reason], request_id=request_id,
        logprobs=[logprob_to_proto(r) for r in logprobs or ()], index=index,
        usage=gateway_pb2.Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                                cached_tokens=cached_tokens),
        timings=gateway_pb2.Timings(**timings), speculation=_speculation(speculation), num_migrations=num_migrations)


def _speculation(counts: SpeculationCounts | None) -> gateway_pb2.Speculation | None:
    if counts is None or not counts.num_verify_steps:
        return None
    return gateway_pb2.Speculation(
        num_proposed=counts.num_proposed, num_accepted=counts.num_accepted,
        acceptance_rate=counts.num_accepted / counts.num_proposed if counts.num_proposed else 0.0,
        tokens_per_verify_step=counts.num_verify_tokens / counts.num_verify_steps,
    )
