"""Text <-> token ids for a Hugging Face checkpoint directory: tokenizer.json through the `tokenizers`
library, and the chat template from tokenizer_config.json rendered with Jinja as transformers does."""

import json
from functools import cached_property
from pathlib import Path

from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer


class TextTokenizer:
    def __init__(self, model_dir: Path) -> None:
        self._tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        config_path = model_dir / "tokenizer_config.json"
        config = json.loads(config_path.read_text()) if config_path.exists() else {}
        self._special = {k: config.get(k) for k in ("bos_token", "eos_token", "pad_token", "unk_token")}
        template = config.get("chat_template")
        self._template = _jinja_environment().from_string(template) if template else None

    @property
    def vocab_size(self) -> int:
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    @cached_property
    def max_token_bytes(self) -> int:
        """The most UTF-8 bytes one token stands for (a byte fragment counts as a whole replacement character):
        a text of B bytes has at least B / max_token_bytes tokens, which bounds a prompt before tokenizing it."""
        texts = self._tokenizer.decode_batch([[i] for i in range(self.vocab_size)], skip_special_tokens=False)
        return max(len(text.encode()) for text in texts)

    def encode(self, text: str) -> list[int]:
        """As a Hugging Face tokenizer does by default (special tokens of the post-processor added)."""
        return self._tokenizer.encode(text, add_special_tokens=True).ids

    def apply_chat_template(self, messages: list[dict[str, str]]) -> list[int]:
        if self._template is None:
            raise ValueError("this model has no chat template; send a prompt or token ids instead")
        text = self._template.render(messages=messages, add_generation_prompt=True, **self._special)
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tokenizer.decode(token_ids, skip_special_tokens=skip_special_tokens)


def _jinja_environment() -> ImmutableSandboxedEnvironment:
    def raise_exception(message: str) -> None:
        raise ValueError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.globals["raise_exception"] = raise_exception
    return env


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas that are always whole characters.

    Decodes a short window of recent tokens and emits only what is new once the window's text no
    longer ends in a partial character (U+FFFD), as text-generation-inference and vLLM do.
    """

    def __init__(self, tokenizer: TextTokenizer) -> None:
        self._tokenizer = tokenizer
        self._ids: list[int] = []
        self._prefix_offset = 0
        self._read_offset = 0

    def push(self, token_ids: list[int]) -> str:
        self._ids.extend(token_ids)
        prefix = self._tokenizer.decode(self._ids[self._prefix_offset:self._read_offset])
        text = self._tokenizer.decode(self._ids[self._prefix_offset:])
        if len(text) <= len(prefix) or text.endswith("\ufffd"):
            return ""
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        return text[len(prefix):]

    def flush(self) -> str:
        """Whatever is left at the end of the stream, partial characters included."""
        prefix = self._tokenizer.decode(self._ids[self._prefix_offset:self._read_offset])
        text = self._tokenizer.decode(self._ids[self._prefix_offset:])
        self._prefix_offset = self._read_offset = len(self._ids)
        return text[len(prefix):]
