"""Service configurations reject invalid values on construction, with ValueError."""

from pathlib import Path

import pytest

from common.basics.config import (
    DecodeConfig,
    GatewayConfig,
    PrefillConfig,
    default_model_dir,
)

MODEL = Path("/models/m")


def describe(overrides: dict) -> str:
    return ",".join(f"{k}={v!r}" for k, v in overrides.items())


def gateway(**overrides) -> GatewayConfig:
    fields = {"model_dir": MODEL, "prefill_addresses": ("127.0.0.1:1",), "decode_addresses": ("127.0.0.1:2",)}
    return GatewayConfig(**(fields | overrides))


def test_defaults_are_valid():
    assert DecodeConfig(MODEL).kv_dtype == "float32"
    assert PrefillConfig(MODEL).max_batch_tokens >= PrefillConfig(MODEL).chunk_size
    assert gateway().port == 50051


@pytest.mark.parametrize(
    "overrides",
    [
        {"port": -1},
        {"port": 65536},
        {"kv_dtype": "int4"},
        {"kv_dtype": "fp16"},
        {"block_size": 0},
        {"threads": -1},
        {"kv_memory_mb": 0},
        {"max_batch_size": 0},
        {"lease_ms": 0},
    ],
    ids=describe,
)
def test_invalid_decode_config_raises(overrides):
    with pytest.raises(ValueError):
        DecodeConfig(MODEL, **overrides)


@pytest.mark.parametrize(
    "overrides",
    [
        {"port": 70000},
        {"kv_dtype": "float64"},
        {"block_size": 0},
        {"chunk_size": 0},
        {"chunk_size": 256, "max_batch_tokens": 255},
    ],
    ids=describe,
)
def test_invalid_prefill_config_raises(overrides):
    with pytest.raises(ValueError):
        PrefillConfig(MODEL, **overrides)


def test_prefill_error_names_both_sizes():
    with pytest.raises(ValueError, match=r"max_batch_tokens \(100\) must be >= chunk_size \(128\)"):
        PrefillConfig(MODEL, chunk_size=128, max_batch_tokens=100)


def test_max_batch_tokens_equal_to_chunk_size_is_accepted():
    assert PrefillConfig(MODEL, chunk_size=64, max_batch_tokens=64).chunk_size == 64


@pytest.mark.parametrize(
    "overrides",
    [
        {"port": -5},
        {"port": 65536},
        {"prefill_addresses": ()},
        {"decode_addresses": ()},
        {"default_max_new_tokens": 0},
        {"default_max_new_tokens": 5000, "max_new_tokens_limit": 4096},
        {"lease_ms": -1},
    ],
    ids=describe,
)
def test_invalid_gateway_config_raises(overrides):
    with pytest.raises(ValueError):
        gateway(**overrides)


def test_default_model_dir_follows_xdg_cache_home():
    assert default_model_dir("/xdg", "/home/u") == Path("/xdg/pdserve/models/SmolLM2-135M-Instruct")
    assert default_model_dir(None, "/home/u") == Path("/home/u/.cache/pdserve/models/SmolLM2-135M-Instruct")


def test_nixl_transport_without_nixl_installed_is_refused_saying_how_to_add_it(monkeypatch):
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *args: None)
    with pytest.raises(ValueError, match=r"--kv-transport nixl needs NIXL.*pip install 'pdserve\[nixl\]'"):
        DecodeConfig(model_dir=MODEL, kv_transport="nixl")
    assert DecodeConfig(model_dir=MODEL, kv_transport="grpc").kv_transport == "grpc"  # gRPC serves without it
