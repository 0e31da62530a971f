"""Shared fixtures: the prepared default model, and a running stack started by the real launcher."""

import os
from pathlib import Path

import torch

# Triton jit-compiles its own standard library when it is first imported, reading TRITON_INTERPRET then,
# and transformers may import it long before the kernel tests run: without CUDA, kernels can only run
# interpreted, so the whole test session says so from the start.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import grpc
import pytest
from stack import Stack, launch_stack, stop_stack

from common.config import default_model_dir
from common.model.prepare import prepare_default_model
from pdserve.v1 import decode_pb2_grpc, gateway_pb2_grpc, prefill_pb2_grpc


@pytest.fixture(scope="session")
def model_dir() -> Path:
    return prepare_default_model(default_model_dir(os.environ.get("XDG_CACHE_HOME"), os.path.expanduser("~")))


@pytest.fixture(scope="session")
def stack(model_dir):
    # Prompt-lookup speculation on by default: every greedy test doubles as a check that speculation is
    # lossless; requests with speculative=False exercise plain decoding.
    process, addresses = launch_stack(model_dir, "--speculative", "prompt-lookup")
    channels = [grpc.insecure_channel(addresses[n]) for n in ("gateway", "prefill", "decode")]
    yield Stack(
        process=process,
        gateway_address=addresses["gateway"],
        prefill_address=addresses["prefill"],
        decode_address=addresses["decode"],
        gateway=gateway_pb2_grpc.GatewayStub(channels[0]),
        prefill=prefill_pb2_grpc.PrefillStub(channels[1]),
        decode=decode_pb2_grpc.DecodeStub(channels[2]),
    )
    for channel in channels:
        channel.close()
    stop_stack(process)


@pytest.fixture(scope="session")
def hf_model(model_dir):
    """The independent reference: Hugging Face transformers on the same weights."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(model_dir)
