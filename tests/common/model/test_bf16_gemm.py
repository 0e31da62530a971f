"""The oneDNN copy of bf16 weights (`--weights bf16` on a CPU with bf16 dot-product units): each product rounds
its activations to bf16, multiplies exactly, sums in float32 and rounds the result to bf16, so it equals the
float64 product of the rounded activations and weights within the float32 summation bound plus one bf16
rounding of the result; it is made only for bf16 weights computing in fp32 on such a CPU; its bytes are
counted; projections then drop their unpacked weight (the tied LM head keeps its rows for lookups)."""

import pytest
import torch
from bounds import dot_product_bound

from common.model.linear import PackedLinear, bf16_gemm_available, make_linear
from common.model.quant_cast import CastWeight
from common.model.weights import load_model, stored_weight_bytes
from common.runtime.machine import machine_facts

pytestmark = pytest.mark.skipif(not bf16_gemm_available(CastWeight.pack(torch.zeros(1, 2), torch.bfloat16)),
                                reason="this CPU has no bf16 dot-product units (AVX-512 BF16 or AMX), or torch "
                                       "has no oneDNN: the bf16 copy is not made here")

U_BF16 = 2.0**-8  # unit roundoff of bfloat16 (8 significant bits)


def _weight(rows: int, cols: int) -> torch.Tensor:
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(0)) * 0.05


@pytest.mark.parametrize("shape", [(1, 96), (2, 96), (5, 96), (17, 96), (300, 96), (2, 3, 96)])
def test_bf16_product_equals_the_float64_product_of_the_rounded_operands(shape):
    weight = _weight(160, 96)
    linear = make_linear(weight, "bf16")
    assert isinstance(linear, PackedLinear) and linear.add_blocked_copy()
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    x_rounded, w_rounded = x.bfloat16().double(), weight.bfloat16().double()
    exact = x_rounded @ w_rounded.t()
    out = linear(x)
    assert out.shape == (*shape[:-1], 160) and out.dtype == torch.float32
    # float32 sums of exact bf16 x bf16 products, then one rounding to bf16. Unrounded activations would miss
    # by about 2^-9 |x| |w| per product, a sum of them far beyond this for most outputs.
    bound = dot_product_bound(x_rounded, w_rounded) * (1 + U_BF16) + U_BF16 * exact.abs()
    assert ((out.double() - exact).abs() <= bound).all()


def test_copy_counts_its_bytes_and_only_bf16_computing_in_fp32_gets_one():
    bf16 = make_linear(_weight(64, 32), "bf16")
    assert bf16.nbytes == 64 * 32 * 2
    assert bf16.add_blocked_copy() and bf16.nbytes == 2 * 64 * 32 * 2
    on_bf16 = PackedLinear(CastWeight.pack(_weight(64, 32).bfloat16(), torch.bfloat16))  # computes in bf16
    assert not on_bf16.add_blocked_copy()
    assert machine_facts()["avx512_bf16"] or machine_facts()["amx"]


def test_dropping_the_unpacked_weight_frees_its_bytes_and_keeps_the_products():
    weight, x = _weight(64, 32), torch.randn(3, 32, generator=torch.Generator().manual_seed(2))
    linear = make_linear(weight, "bf16")
    linear.add_blocked_copy()
    before = linear(x)
    assert linear.drop_unpacked() and linear.weight is None and linear.nbytes == 64 * 32 * 2
    assert torch.equal(linear(x), before) and torch.equal(linear(x[None]), before[None])


def test_default_model_in_bf16_holds_the_blocked_projections_and_the_embedding_twice(model_dir):
    model = load_model(model_dir, "bf16")
    single = stored_weight_bytes(model)
    assert model.add_blocked_copies() == 1 + 4 * model.config.num_layers
    assert all(linear.weight is None for linear in model.linears()[1:]) and model.lm_head.weight is not None
    # the projections' bytes are unchanged (their copy replaced them); the tied head adds its copy
    head = model.lm_head.out_features * model.lm_head.in_features * 2
    assert stored_weight_bytes(model)["total"] == single["total"] + head
