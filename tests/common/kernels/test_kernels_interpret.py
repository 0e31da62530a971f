"""Each Triton kernel against its torch reference, run by triton's interpreter on CPU tensors.

triton reads TRITON_INTERPRET when a kernel is defined (at import) and again when it launches, so the
variable is set around both: before the kernel modules are imported, and around each test. In between it
is restored, so it does not leak into the tier processes that other test modules start.
"""

import importlib
import os
import sys

import pytest
import torch

pytestmark = pytest.mark.kernels

_previous = os.environ.get("TRITON_INTERPRET")
os.environ["TRITON_INTERPRET"] = "1"
try:
    for _name in ("common.kernels.paged_attention", "common.kernels.quant_matmul", "kernel_checks"):
        if _name in sys.modules:  # defined earlier without the interpreter: define it again
            importlib.reload(sys.modules[_name])
    import kernel_checks
finally:
    if _previous is None:
        os.environ.pop("TRITON_INTERPRET")
    else:
        os.environ["TRITON_INTERPRET"] = _previous


@pytest.fixture(autouse=True)
def _interpret(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def test_paged_attention_reference_equals_torch_sdpa():
    kernel_checks.check_paged_attention_reference_equals_sdpa()


@pytest.mark.parametrize("kv_dtype", [torch.float32, torch.float16])
def test_paged_attention_decode_matches_reference(kv_dtype):
    kernel_checks.check_paged_attention("cpu", kv_dtype)


@pytest.mark.parametrize("kv_dtype", [torch.int8, torch.float8_e4m3fn])
def test_paged_attention_decode_on_a_quantised_pool_matches_reference(kv_dtype):
    kernel_checks.check_paged_attention_quantised("cpu", kv_dtype)


def test_paged_attention_decode_with_group_of_one_and_larger_blocks():
    kernel_checks.check_paged_attention("cpu", torch.float32, num_heads=2, num_kv_heads=2, block_size=8,
                                        context_lens=(8, 9, 30), num_blocks=12)


def test_int8_matmul_matches_reference():
    kernel_checks.check_int8_matmul("cpu", block_m=16, block_n=16, block_k=32)


@pytest.mark.parametrize("group_size", [16, 32])  # 72 = 2 * 32 + 8: a short last group
def test_int4_matmul_matches_reference(group_size):
    kernel_checks.check_int4_matmul("cpu", group_size=group_size, block_m=16, block_n=16, block_k=16)
