"""The default model's conversion (GGUF -> Hugging Face directory) against transformers' own GGUF loader."""

import pytest
import torch

from pdserve.prepare.default_model import default_gguf_path


@pytest.fixture(scope="module")
def transformers_from_gguf():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = default_gguf_path()
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    return model, tokenizer


def test_converted_weights_equal_transformers_gguf_loader(model_dir, transformers_from_gguf):
    from transformers import LlamaForCausalLM

    ours = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32).state_dict()
    reference = transformers_from_gguf[0].state_dict()
    assert ours.keys() == reference.keys()
    mismatched = [name for name in reference if not torch.equal(ours[name], reference[name])]
    assert not mismatched


TEXTS = [
    "Hello world 12345",
    "  leading spaces\n\ttabs and\r\nnewlines   ",
    "héllo wörld ünïcödé 日本語 🙂🚀",
    "def f(x):\n    return x**2  # 3.14159",
    "<|im_start|>user\nhi<|im_end|>",
    "URLs like https://example.com/a?b=c&d=1 and emails a.b@c.org",
]


@pytest.mark.parametrize("text", TEXTS)
def test_converted_tokenizer_equals_transformers_gguf_tokenizer(model_dir, transformers_from_gguf, text):
    from common.basics.tokenizer import TextTokenizer

    assert TextTokenizer(model_dir).encode(text) == transformers_from_gguf[1](text).input_ids
