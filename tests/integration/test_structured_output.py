"""Structured output through the running stack: 30 chat prompts over 5 JSON schemas, each generated greedily with
speculation (prompt lookup, the stack's default) and without. Every output parses and validates against its schema
(jsonschema), the two runs are token for token the same (proposals are checked against the grammar, so speculation
stays lossless), and (on two of them) a constrained greedy output is, step by step, the most likely token the grammar allows under
transformers on the same weights (up to near-ties within the float32 bound). Regular expressions and Lark grammars
hold too; a format that cannot compile is INVALID_ARGUMENT at the gateway."""

import json
import re
from concurrent.futures import ThreadPoolExecutor

import grpc
import jsonschema
import numpy as np
import pytest
import torch
from bounds import decoder_tolerance
from helpers import collect, request

from common.basics.grammar import grammar_of, model_grammars
from common.basics.model_config import ModelConfig
from pdserve.v1 import gateway_pb2

MAX_NEW_TOKENS = 120
SCHEMAS = {
    "person": {"type": "object", "properties": {"name": {"type": "string", "maxLength": 24},
                                                 "age": {"type": "integer", "minimum": 0, "maximum": 130}},
               "required": ["name", "age"], "additionalProperties": False},
    "colors": {"type": "array", "items": {"type": "string", "enum": ["red", "green", "blue", "yellow", "black"]},
               "minItems": 1, "maxItems": 3},
    "place": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 24},
                                                "country": {"type": "string", "maxLength": 24},
                                                "population": {"type": "integer", "minimum": 0}},
              "required": ["city", "country"], "additionalProperties": False},
    "verdict": {"type": "object", "properties": {"answer": {"type": "boolean"},
                                                  "confidence": {"type": "integer", "minimum": 0, "maximum": 100}},
                "required": ["answer", "confidence"], "additionalProperties": False},
    "note": {"type": "object", "properties": {"title": {"type": "string", "maxLength": 32},
                                               "tags": {"type": "array", "items": {"type": "string", "maxLength": 12},
                                                        "maxItems": 3}},
             "required": ["title", "tags"], "additionalProperties": False},
}
QUESTIONS = {
    "person": ["Describe Ada Lovelace as JSON.", "Give me a fictional pirate as JSON.", "Who wrote Hamlet? JSON.",
               "Invent a chess champion.", "Describe your grandmother.", "A famous scientist, as data."],
    "colors": ["Which colors are on the French flag?", "Colors of a zebra?", "Pick your favourite colors.",
               "What color is the sky?", "Colors of a traffic light?", "Colors of the Italian flag?"],
    "place": ["Where is the Eiffel Tower?", "Tell me about Tokyo.", "Biggest city in Brazil?",
              "Where do kangaroos live?", "The capital of Kenya.", "A city on the Danube."],
    "verdict": ["Is the Earth flat?", "Is water wet?", "Is 17 a prime number?", "Can penguins fly?",
                "Is Python a programming language?", "Is the moon made of cheese?"],
    "note": ["Summarize a meeting about budgets.", "Note for a grocery trip.", "A reminder to call mom.",
             "Notes on the French revolution.", "Plan for a birthday party.", "Ideas for a science fair."],
}
CASES = [(name, question) for name in SCHEMAS for question in QUESTIONS[name]]


def schema_request(name: str, question: str, speculative: bool) -> gateway_pb2.GenerateRequest:
    req = request(messages=[("system", "Answer with JSON only."), ("user", question)], max_new_tokens=MAX_NEW_TOKENS,
                  speculative=speculative)
    req.response_format.json_schema = json.dumps(SCHEMAS[name])
    return req


@pytest.fixture(scope="module")
def outputs(stack):
    """(schema, question, speculative) -> (token ids, text, finish reason); eight requests at a time."""
    keys = [(name, question, speculative) for name, question in CASES for speculative in (True, False)]
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda key: collect(stack.gateway, schema_request(*key)), keys))
    return {key: (tokens, text, last.finish_reason) for key, (tokens, text, last) in zip(keys, results)}


def test_thirty_prompts_over_five_schemas_parse_and_validate(outputs):
    assert len(CASES) == 30 and len(SCHEMAS) == 5
    for (name, question, speculative), (_, text, reason) in outputs.items():
        assert reason != 2, f"{name} / {question}: hit max_new_tokens before the JSON closed: {text!r}"  # LENGTH
        jsonschema.validate(json.loads(text), SCHEMAS[name])


def test_speculation_changes_no_constrained_token(outputs):
    for name, question in CASES:
        assert outputs[(name, question, True)][0] == outputs[(name, question, False)][0], (name, question)


def constrained_greedy_reference(hf_model, model_dir, prompt_ids: list[int], grammar: str, steps: int):
    """Greedy over transformers' logits masked by the grammar (llguidance, stepped here independently of the
    service): the tokens, and how many are decided (before the first near-tie among the allowed tokens)."""
    config = ModelConfig.from_dir(model_dir)
    matcher = model_grammars(model_dir, config).matcher(grammar)
    ids, decided = list(prompt_ids), None
    with torch.no_grad():
        for step in range(steps):
            logits = hf_model[0](torch.tensor([ids])).logits[0, -1].float()
            bits = np.unpackbits(np.frombuffer(matcher.compute_bitmask(), dtype=np.uint8), bitorder="little")
            allowed = torch.from_numpy(bits[:config.vocab_size].astype(bool))
            shaped = logits.masked_fill(~allowed, float("-inf"))
            top2 = shaped.topk(2).values
            if decided is None and float(top2[0] - top2[1]) <= 4 * decoder_tolerance(config, logits):
                decided = step
            token = int(shaped.argmax())
            ids.append(token)
            if token in config.eos_token_ids:
                break
            assert matcher.consume_token(token)
    out = ids[len(prompt_ids):]
    return out, len(out) if decided is None else decided


@pytest.mark.parametrize("name, question", [CASES[0], CASES[13]])
def test_constrained_greedy_takes_the_most_likely_allowed_token_at_each_step(outputs, hf_model, model_dir, name,
                                                                             question):
    got = outputs[(name, question, False)][0]
    messages = [{"role": "system", "content": "Answer with JSON only."}, {"role": "user", "content": question}]
    prompt_ids = hf_model[1].apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                 return_dict=False)
    expected, kept = constrained_greedy_reference(hf_model, model_dir, prompt_ids,
                                                  grammar_of("json_schema", json.dumps(SCHEMAS[name])), len(got))
    assert kept >= min(len(expected), 8), f"near-ties from token {kept}: choose another prompt"
    assert got[:kept] == expected[:kept]


PHONE_OR_RAIN = "Give me a phone number, or answer: is it raining?"


@pytest.mark.parametrize("kind, spec, question, check", [
    ("regex", r"\d{3}-\d{4}", PHONE_OR_RAIN, lambda text: re.fullmatch(r"\d{3}-\d{4}", text)),
    ("regex", r"(yes|no), because [a-z ]{5,40}\.", PHONE_OR_RAIN,
     lambda text: re.fullmatch(r"(yes|no), because [a-z ]{5,40}\.", text)),
    ("lark", 'start: "The answer is " ANSWER "."\nANSWER: "yes" | "no" | "maybe"', PHONE_OR_RAIN,
     lambda text: text in ("The answer is yes.", "The answer is no.", "The answer is maybe.")),
    ("json_object", "", "Return a JSON object with the keys name and age for a person called Bob aged 30.",
     lambda text: isinstance(json.loads(text), dict)),
], ids=["phone", "reason", "lark", "json-object"])
def test_regex_lark_and_json_object_formats_hold(stack, kind, spec, question, check):
    req = request(messages=[("user", question)], max_new_tokens=MAX_NEW_TOKENS)
    if kind == "json_object":
        req.response_format.json_object = True
    else:
        setattr(req.response_format, kind, spec)
    _, text, last = collect(stack.gateway, req)
    assert last.finish_reason == 1 and check(text), text  # STOP: the format completed


@pytest.mark.parametrize("kind, spec, message", [
    ("json_schema", "{not json", "json_schema is not valid JSON"),
    ("regex", "[a-", "unclosed character class"),
    ("lark", "start: undefined_rule", "undefined_rule"),
])
def test_a_format_that_cannot_compile_is_invalid_argument(stack, kind, spec, message):
    req = request("Hi", max_new_tokens=4)
    setattr(req.response_format, kind, spec)
    with pytest.raises(grpc.RpcError) as raised:
        collect(stack.gateway, req)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT and message in raised.value.details()
    assert f"response_format.{kind}" in raised.value.details()
