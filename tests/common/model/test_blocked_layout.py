"""The oneDNN-blocked weight copy (`--cpu-weight-layout dual`): products through it equal the float64
product with the same weight for any number of rows, it is only made where oneDNN runs it, its memory is
counted, and every dense linear of a model (MoE experts included) gets one."""

import pytest
import torch
from tiny_mixtral import build_tiny_mixtral

from common.model.linear import DenseLinear, blocked_layout_available
from common.model.weights import load_model

pytestmark = pytest.mark.skipif(not blocked_layout_available(torch.zeros(1)), reason="torch built without oneDNN")


def _weight(rows: int, cols: int) -> torch.Tensor:
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(0)) * 0.05


@pytest.mark.parametrize("shape", [(1, 96), (2, 96), (5, 96), (17, 96), (2, 3, 96)])
def test_blocked_product_equals_the_float64_product(shape):
    weight = _weight(160, 96)
    linear = DenseLinear(weight)
    assert linear.add_blocked_copy() and linear.blocked is not None
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    expected = (x.double() @ weight.double().t()).float()
    out = linear(x)
    assert out.shape == (*shape[:-1], 160)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_blocked_copy_doubles_the_counted_bytes_and_is_refused_below_float32():
    weight = _weight(64, 32)
    linear = DenseLinear(weight)
    assert linear.nbytes == 64 * 32 * 4
    linear.add_blocked_copy()
    assert linear.nbytes == 2 * 64 * 32 * 4
    half = DenseLinear(weight.bfloat16())
    assert not half.add_blocked_copy() and half.blocked is None
    assert half(torch.ones(3, 32, dtype=torch.bfloat16)).shape == (3, 64)


def test_every_dense_linear_of_a_mixture_of_experts_model_gets_a_copy(tmp_path):
    build_tiny_mixtral(tmp_path, 128)
    model = load_model(tmp_path, "fp32")
    layers = model.config.num_layers
    experts = model.config.num_experts
    assert model.add_blocked_copies() == 1 + layers * (2 + 2 * experts)  # head, qkv and out, gate_up and down
