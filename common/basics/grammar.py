"""Structured output: a request's response format (a JSON schema, any JSON object, a regular expression or a Lark
grammar) as one llguidance grammar, checked against the model's tokenizer before any tier sees it. Torch-free: the
gateway compiles and checks; the model tiers enforce it while choosing tokens (common/model/constraint.py)."""

import json
from functools import cached_property
from pathlib import Path

import llguidance

FORMATS = ("json_schema", "json_object", "regex", "lark")


class GrammarError(ValueError):
    """A response format that cannot be compiled; the message says why."""


def grammar_of(kind: str, spec: str) -> str:
    """The llguidance grammar of a response format. Raises GrammarError for a JSON schema that is not JSON."""
    if kind == "json_schema":
        try:
            schema = json.loads(spec)
        except json.JSONDecodeError as error:
            raise GrammarError(f"json_schema is not valid JSON: {error}") from None
        if not isinstance(schema, dict):
            raise GrammarError("json_schema must be a JSON object (a schema)")
        return llguidance.LLMatcher.grammar_from_json_schema(schema)
    if kind == "json_object":
        return llguidance.LLMatcher.grammar_from_json_schema({"type": "object"})
    if kind == "regex":
        return llguidance.LLMatcher.grammar_from_regex(spec)
    if kind == "lark":
        return llguidance.LLMatcher.grammar_from_lark(spec)
    raise GrammarError(f"response format {kind!r} is not one of {FORMATS}")


class ModelGrammars:
    """The model's tokenizer as llguidance sees it (built once, ~0.3 s), to check and enforce grammars."""

    def __init__(self, model_dir: Path, vocab_size: int, eos_token_ids: tuple[int, ...]) -> None:
        self._tokenizer_json = (model_dir / "tokenizer.json").read_text()
        self.vocab_size = vocab_size
        self.eos_token_ids = tuple(eos_token_ids)

    @cached_property
    def tokenizer(self) -> llguidance.LLTokenizer:
        return llguidance.LLTokenizer(self._tokenizer_json, n_vocab=self.vocab_size,
                                      eos_token=list(self.eos_token_ids) or None)

    def check(self, grammar: str) -> None:
        """Raises GrammarError saying what is wrong with the grammar, if anything."""
        problem = llguidance.LLMatcher.validate_grammar(grammar, self.tokenizer)
        if problem:
            raise GrammarError(problem.strip())

    def matcher(self, grammar: str) -> llguidance.LLMatcher:
        matcher = llguidance.LLMatcher(self.tokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise GrammarError(matcher.get_error())
        return matcher


def model_grammars(model_dir: Path, model) -> ModelGrammars:
    """The grammars of the model in model_dir (`model`: its ModelConfig)."""
    return ModelGrammars(model_dir, model.vocab_size, tuple(model.eos_token_ids))
