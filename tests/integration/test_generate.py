"""Greedy output through the running disaggregated service equals Hugging Face transformers' greedy
generate on the same weights, token for token; concurrent requests share decode batches."""

import concurrent.futures
import time

import pytest
from helpers import assert_greedy_matches, collect, hf_greedy, request
from stack import STACK_BLOCK_SIZE, STACK_CHUNK_SIZE, paused

from pdserve.v1 import common_pb2

MAX_NEW_TOKENS = 20
_PARAGRAPH = (
    "The history of computing is a story of abstraction. Early machines were programmed by rewiring "
    "panels; later, stored programs let the same hardware run many tasks. Compilers lifted programmers "
    "from machine code to languages that read almost like mathematics, and operating systems hid the "
    "details of disks, memory and devices behind files and processes. "
)
PROMPTS = {
    "short": "The capital of France is",
    "code": "def fibonacci(n):\n    ",
    "story": "Once upon a time, in a small village by the sea, there lived",
    "unicode": "Translate to French: The weather is nice today. → ",
    # Longer than the stack's prefill chunk (32 tokens): prefilled in several chunks.
    "longer_than_chunk": _PARAGRAPH + "In one sentence, the main idea of this paragraph is that",
    # About 400 tokens: spans some 25 KV blocks of 16 tokens.
    "many_blocks": _PARAGRAPH * 5 + "Summarize the text above in one sentence:",
}
CHATS = {
    "chat": [("user", "What is the tallest mountain in the world?")],
    "chat_with_system": [("system", "You are a terse assistant."), ("user", "List three primary colors.")],
}


def _hf_ids(hf_model, name: str) -> list[int]:
    tokenizer = hf_model[1]
    if name in PROMPTS:
        return tokenizer(PROMPTS[name]).input_ids
    messages = [{"role": role, "content": content} for role, content in CHATS[name]]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tokenizer(text, add_special_tokens=False).input_ids


def _service_request(name: str, max_new_tokens: int = MAX_NEW_TOKENS):
    if name in PROMPTS:
        return request(PROMPTS[name], max_new_tokens=max_new_tokens)
    return request(messages=CHATS[name], max_new_tokens=max_new_tokens)


@pytest.mark.parametrize("name", [*PROMPTS, *CHATS])
def test_greedy_output_equals_transformers(stack, hf_model, name):
    prompt_ids = _hf_ids(hf_model, name)
    expected = hf_greedy(hf_model, prompt_ids, MAX_NEW_TOKENS)

    token_ids, text, last = collect(stack.gateway, _service_request(name))

    assert_greedy_matches(hf_model, prompt_ids, token_ids, expected)
    assert text == hf_model[1].decode(expected, skip_special_tokens=True)
    assert last.usage.prompt_tokens == len(prompt_ids)
    assert last.usage.completion_tokens == len(expected)
    expected_reason = common_pb2.FINISH_REASON_STOP if expected[-1] == hf_model[1].eos_token_id \
        else common_pb2.FINISH_REASON_LENGTH
    assert last.finish_reason == expected_reason


def test_prompt_token_ids_equal_transformers(stack, hf_model):
    prompt_ids = hf_model[1]("Numbers: 1, 2, 3, 4,").input_ids
    token_ids, _, _ = collect(stack.gateway, request(token_ids=prompt_ids, max_new_tokens=MAX_NEW_TOKENS))
    assert_greedy_matches(hf_model, prompt_ids, token_ids, hf_greedy(hf_model, prompt_ids, MAX_NEW_TOKENS))


def test_long_prompt_was_prefilled_in_chunks(stack, hf_model):
    """The stack's prefill tier runs chunks of STACK_CHUNK_SIZE tokens: a ~400-token prompt alone takes one
    forward pass per chunk, and its greedy output is still transformers'. The prompt opens with words no other
    test sends, so the prefix cache holds none of it."""
    text = "For the chunking test. " + PROMPTS["many_blocks"]
    prompt_ids = hf_model[1](text).input_ids
    steps_before = stack.prefill_stats().num_steps
    token_ids, _, last = collect(stack.gateway, request(text, max_new_tokens=2))
    assert last.usage.cached_tokens == 0
    assert stack.prefill_stats().num_steps - steps_before == -(-len(prompt_ids) // STACK_CHUNK_SIZE) > 10
    assert token_ids == hf_greedy(hf_model, prompt_ids, 2)
    assert last.usage.prompt_tokens == len(prompt_ids) > STACK_BLOCK_SIZE * 20
    assert last.timings.prefill_ms > 0 and last.timings.time_to_first_token_ms > 0
    assert last.timings.total_ms >= last.timings.time_to_first_token_ms


def _concurrent_prompts() -> list[tuple[str, int]]:
    words = ("apples", "rivers", "engines", "poems", "planets", "bridges", "violins", "forests")
    prompts = []
    for i in range(32):
        topic = words[i % len(words)]
        prompt = f"Here is fact number {i} about {topic}:" + " It is well known that" * (i % 5)
        prompts.append((prompt, 6 + i % 7))
    return prompts


def test_concurrent_requests_equal_solo_and_share_batches(stack):
    """Plain decoding (speculation off: one token per sequence per step): 32 requests arriving together give
    their solo outputs, and the decode tier runs them in shared steps. The decode tier is paused while they
    are sent, so they all wait at their reservation and then arrive at once, whatever the machine's speed."""
    prompts = _concurrent_prompts()
    solo = [collect(stack.gateway, request(p, max_new_tokens=n, speculative=False))[0] for p, n in prompts]
    before = stack.decode_stats()

    with concurrent.futures.ThreadPoolExecutor(max_workers=len(prompts)) as pool:
        with paused(stack.tier_pid("decode")):
            futures = [pool.submit(collect, stack.gateway, request(p, max_new_tokens=n, speculative=False))
                       for p, n in prompts]
            time.sleep(1.0)  # for the requests to reach the gateway; later ones would only batch less
        together = [f.result()[0] for f in futures]
    after = stack.decode_stats()

    assert together == solo
    # Tokens per step is the mean batch size (the first token of each comes from prefill): one if the
    # requests had run one after another.
    tokens, steps = after.num_tokens_generated - before.num_tokens_generated, after.num_steps - before.num_steps
    assert tokens == sum(len(t) - 1 for t in together)
    assert tokens / steps > 2, (tokens, steps)
