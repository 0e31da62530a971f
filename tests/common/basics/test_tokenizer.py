"""TextTokenizer against Hugging Face transformers, and IncrementalDetokenizer's streamed text."""

import pytest

from common.basics.tokenizer import IncrementalDetokenizer

MULTIBYTE_TEXTS = [
    "naïve café, Straße, Ünïcödé",
    "日本語のテキストと中文字符测试，好的。",
    "Emoji 😀🎉🦀 and a family 👨‍👩‍👧 in one line",
    "mixed: ça va? 한국어 🇫🇷 Ω≈ç√∫",
]

CORPUS = [
    "Hello world",
    "def f(x):\n    return x**2  # square\n",
    "3.14159 + 12345678 = 12345681.14159",
    "naïve café 日本語 😀🎉",
    "a    b\t\t\n\n   c  ",
    "<|im_start|>user\nhi<|im_end|>",
    "before<|endoftext|>after",
    " leading space",
    "",
    "   ",
    "URL: https://example.com/a?b=c&d=e#f",
]


def hf_chat_ids(hf_tokenizer, messages) -> list[int]:
    encoded = hf_tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    # transformers 5 returns a BatchEncoding; older versions a plain list of ids.
    return list(encoded) if isinstance(encoded, list) else list(encoded["input_ids"])


@pytest.mark.parametrize(
    "messages",
    [
        [{"role": "user", "content": "hi"}],
        [{"role": "system", "content": "Answer in one word."}, {"role": "user", "content": "hi"}],
        [
            {"role": "user", "content": "What is 2 + 2?"},
            {"role": "assistant", "content": "4."},
            {"role": "user", "content": "And in words, s'il vous plaît? 😀"},
        ],
    ],
    ids=["user", "system", "multi_turn"],
)
def test_chat_template_matches_transformers(tokenizer, hf_tokenizer, messages):
    assert tokenizer.apply_chat_template(messages) == hf_chat_ids(hf_tokenizer, messages)


def test_chat_template_ends_with_the_assistant_prompt(tokenizer):
    text = tokenizer.decode(tokenizer.apply_chat_template([{"role": "user", "content": "hi"}]))
    assert text.endswith("user\nhi\nassistant\n")


@pytest.mark.parametrize("text", CORPUS)
def test_encode_matches_transformers(tokenizer, hf_tokenizer, text):
    assert tokenizer.encode(text) == hf_tokenizer(text).input_ids


@pytest.mark.parametrize("text", MULTIBYTE_TEXTS)
def test_token_by_token_deltas_rebuild_the_full_decode(tokenizer, text):
    ids = tokenizer.encode(text)
    assert len(ids) > len(text.split())  # multi-byte characters span several tokens
    detokenizer = IncrementalDetokenizer(tokenizer)
    deltas = [detokenizer.push([token_id]) for token_id in ids]
    assert "".join(deltas) + detokenizer.flush() == tokenizer.decode(ids) == text


@pytest.mark.parametrize("text", MULTIBYTE_TEXTS)
def test_deltas_never_contain_a_replacement_character(tokenizer, text):
    detokenizer = IncrementalDetokenizer(tokenizer)
    deltas = [detokenizer.push([token_id]) for token_id in tokenizer.encode(text)]
    assert not [d for d in deltas if "\ufffd" in d]
    assert detokenizer.flush() == ""


def test_pushing_several_tokens_at_once_gives_the_same_text(tokenizer):
    ids = tokenizer.encode(MULTIBYTE_TEXTS[2])
    detokenizer = IncrementalDetokenizer(tokenizer)
    deltas = [detokenizer.push(ids[i:i + 3]) for i in range(0, len(ids), 3)]
    assert "".join(deltas) + detokenizer.flush() == MULTIBYTE_TEXTS[2]


def test_flush_releases_a_trailing_partial_character(tokenizer):
    ids = tokenizer.encode("ok 🦀")
    partial = ids[:-1]  # the crab's last byte is missing
    detokenizer = IncrementalDetokenizer(tokenizer)
    streamed = "".join(detokenizer.push([token_id]) for token_id in partial)
    assert "\ufffd" not in streamed
    assert streamed + detokenizer.flush() == tokenizer.decode(partial)


def test_special_tokens_are_not_streamed(tokenizer):
    ids = tokenizer.encode("<|im_start|>assistant\nDone.<|im_end|>")
    detokenizer = IncrementalDetokenizer(tokenizer)
    text = "".join(detokenizer.push([token_id]) for token_id in ids) + detokenizer.flush()
    assert text == "assistant\nDone."
