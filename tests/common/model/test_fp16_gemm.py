"""The FBGEMM copy of fp16 weights (`--cpu-weight-layout dual` with `--weights fp16` on CPU): its products
equal the float64 product with the same fp16-rounded weight for any number of rows, it is made only for fp16
weights computing in fp32, its bytes are counted, projections then drop their unpacked weight (the tied LM head
keeps its rows for lookups), and the default model through it gives transformers' logits on the same
fp16-rounded weights."""

import copy

import pytest
import torch
from bounds import assert_logits_match, decoder_tolerance, dot_product_bound
from tiny_mixtral import build_tiny_mixtral

from common.kv.pool import KvPool
from common.model.linear import PackedLinear, fp16_gemm_available, make_linear
from common.model.quant_cast import CastWeight
from common.model.runner import ModelRunner, PrefillChunk
from common.model.weights import load_model, stored_weight_bytes

pytestmark = pytest.mark.skipif(not fp16_gemm_available(CastWeight.pack(torch.zeros(1, 2), torch.float16)),
                                reason="torch built without FBGEMM")


def _weight(rows: int, cols: int) -> torch.Tensor:
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(0)) * 0.05


@pytest.mark.parametrize("shape", [(1, 96), (2, 96), (5, 96), (17, 96), (300, 96), (2, 3, 96)])
def test_fp16_product_equals_the_float64_product_with_the_rounded_weight(shape):
    weight = _weight(160, 96)
    linear = make_linear(weight, "fp16")
    assert isinstance(linear, PackedLinear) and linear.add_blocked_copy()
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    rounded = weight.half().double()
    expected = x.double() @ rounded.t()
    out = linear(x)
    assert out.shape == (*shape[:-1], 160) and out.dtype == torch.float32
    # Any float32 summation order of 96 products is within gamma_96 |x| |w| (tests/bounds.py); an fp16
    # weight that was not the rounded one misses by about 2^-12 |w| per product, 20x that bound.
    assert ((out.double() - expected).abs() <= dot_product_bound(x, rounded)).all()


def test_copy_counts_its_bytes_and_only_fp16_computing_in_fp32_gets_one():
    fp16 = make_linear(_weight(64, 32), "fp16")
    assert fp16.nbytes == 64 * 32 * 2
    fp16.add_blocked_copy()
    assert fp16.nbytes == 2 * 64 * 32 * 2
    for name in ("int8", "int4-g32"):  # bf16: tests/common/model/test_bf16_gemm.py
        other = make_linear(_weight(64, 32), name)
        assert not other.add_blocked_copy() and other.nbytes == other.weight.nbytes
    on_half = PackedLinear(CastWeight.pack(_weight(64, 32).half(), torch.float16))  # computes in fp16
    assert not on_half.add_blocked_copy()


def test_dropping_the_unpacked_weight_frees_its_bytes_and_keeps_the_products():
    weight, x = _weight(64, 32), torch.randn(3, 32, generator=torch.Generator().manual_seed(2))
    linear = make_linear(weight, "fp16")
    assert not linear.drop_unpacked()  # no packed copy yet: the unpacked weight is all there is
    linear.add_blocked_copy()
    before = linear(x)
    assert linear.drop_unpacked() and linear.weight is None
    assert linear.nbytes == 64 * 32 * 2
    assert torch.equal(linear(x), before) and torch.equal(linear(x[None]), before[None])


def test_default_model_in_fp16_holds_the_packed_projections_and_the_embedding_twice(model_dir):
    """Every projection keeps only its packed copy; the tied embedding keeps its rows (lookups) and a packed
    copy (the LM head). The expected bytes come from the checkpoint's tensor sizes."""
    from safetensors import safe_open
    expected = 0
    with safe_open(str(model_dir / "model.safetensors"), "pt") as f:
        for name in f.keys():
            numel = f.get_slice(name).get_shape()
            numel = numel[0] * (numel[1] if len(numel) > 1 else 1)
            is_norm = name.endswith("norm.weight")
            expected += numel * 4 if is_norm else numel * 2  # norms stay float32; the rest is fp16
            if name == "model.embed_tokens.weight":
                expected += numel * 2  # the LM head's packed copy
    model = load_model(model_dir, "fp16")
    model.add_blocked_copies()
    assert all(linear.weight is None for linear in model.linears()[1:]) and model.lm_head.weight is not None
    assert stored_weight_bytes(model)["total"] == expected


def test_every_linear_of_a_mixture_of_experts_model_gets_a_copy(tmp_path):
    build_tiny_mixtral(tmp_path, 128)
    model = load_model(tmp_path, "fp16")
    before = stored_weight_bytes(model)["total"]
    layers, experts = model.config.num_layers, model.config.num_experts
    assert model.add_blocked_copies() == 1 + layers * (2 + 2 * experts)  # head, qkv and out, gate_up and down
    assert stored_weight_bytes(model)["total"] > before


def test_default_model_through_the_copies_matches_transformers_on_the_rounded_weights(model_dir, hf_model,
                                                                                     hf_model_f64):
    """The reference: transformers in float64 on the checkpoint's weights rounded to fp16 (what the format
    stores); our fp16 model with every FBGEMM copy must give its logits over a chunked prefill, within the
    float32 decoder bound (tests/bounds.py)."""
    model = load_model(model_dir, "fp16")
    assert model.add_blocked_copies() == 1 + 4 * model.config.num_layers
    c = model.config
    runner = ModelRunner(model, KvPool(num_layers=c.num_layers, num_blocks=8, block_size=4,
                                       num_kv_heads=c.num_kv_heads, head_dim=c.head_dim, dtype=torch.float32))
    tokenizer = hf_model[1]
    ids = tokenizer("Paged attention keeps the cache in blocks, so a sequence grows one block at a time").input_ids
    rounded = copy.deepcopy(hf_model_f64)
    with torch.no_grad():
        for parameter in rounded.parameters():
            if parameter.dim() == 2:
                parameter.copy_(parameter.half().double())
        expected = rounded(torch.tensor([ids])).logits[0]  # (tokens, vocab) float64
    blocks = [6, 1, 4, 0, 7, 2]
    first = runner.run_prefill([PrefillChunk(ids[:5], 0, blocks)])
    rest = runner.run_prefill([PrefillChunk(ids[5:], 5, blocks)])
    assert_logits_match(first[0], expected[4], decoder_tolerance(c, expected[4]))
    assert_logits_match(rest[0], expected[-1], decoder_tolerance(c, expected[-1]))
