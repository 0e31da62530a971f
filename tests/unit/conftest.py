"""Fixtures for unit tests: the prepared default model's tokenizer (no weights loaded, no network)."""

import pytest

from common.tokenizer import TextTokenizer


@pytest.fixture(scope="session")
def tokenizer(model_dir) -> TextTokenizer:
    return TextTokenizer(model_dir)


@pytest.fixture(scope="session")
def hf_tokenizer(model_dir):
    """The independent reference: Hugging Face transformers' tokenizer for the same directory."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)
