"""Shared fixtures: the prepared default model, and a running stack started by the real launcher."""

import os
from pathlib import Path

# Before gRPC loads: the tests fork stacks (preexec_fn) while their channels are busy (pdserve/__init__.py says why).
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")

import torch  # noqa: E402

# Triton jit-compiles its own standard library when it is first imported, reading TRITON_INTERPRET then,
# and transformers may import it long before the kernel tests run: without CUDA, kernels can only run
# interpreted, so the whole test session says so from the start.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
from stack import running_stack

from common.basics.config import default_model_dir
from common.basics.tokenizer import TextTokenizer
from common.runtime.machine import describe_machine
from pdserve.prepare.default_model import prepare_default_model


def pytest_report_header(config) -> list[str]:
    """Which machine ran the suite: kernels (and so summation orders) differ between CPUs."""
    return [f"machine: {describe_machine()}"]


@pytest.fixture(scope="session")
def model_dir() -> Path:
    return prepare_default_model(default_model_dir(os.environ.get("XDG_CACHE_HOME"), os.path.expanduser("~")))


@pytest.fixture(scope="session")
def stack(model_dir):
    # Prompt-lookup speculation on by default: every greedy test doubles as a check that speculation is
    # lossless; requests with speculative=False exercise plain decoding. A fixed k proposes wherever the text
    # repeats, so what speculation does here does not hang on this machine's measured verify cost.
    with running_stack(model_dir, "--speculative", "prompt-lookup", "--speculative-fixed-k",
                       "--num-speculative-tokens", "4") as stack:
        yield stack


@pytest.fixture(scope="session")
def hf_model(model_dir):
    """The independent reference: Hugging Face transformers on the same weights."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(model_dir)


@pytest.fixture(scope="session")
def hf_model_f64(model_dir):
    """transformers in float64 on the same weights: the exact reference float32 results are bounded against."""
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float64).eval()


@pytest.fixture(scope="session")
def tokenizer(model_dir) -> TextTokenizer:
    return TextTokenizer(model_dir)


@pytest.fixture(scope="session")
def hf_tokenizer(model_dir):
    """The independent reference: Hugging Face transformers' tokenizer for the same directory."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)
