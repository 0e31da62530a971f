"""Weight formats on synthetic weights: each packing reproduces its weight within the format's error bound,
products equal the product with the dequantised weight, packed weights behave like the tensors the model
expects (cat, row gather, device/dtype moves), and checkpoints reload bit for bit."""

import pytest
import torch
import torch.nn.functional as F

from common.kernels.quant_matmul import int4_matmul_reference, int8_matmul_reference
from common.model.linear import WEIGHT_FORMATS, DenseLinear, PackedLinear, make_linear
from common.model.packed import ROW_CHUNK
from common.model.quant_cast import CastWeight
from common.model.quant_fp8 import Fp8Weight
from common.model.quant_int4 import Int4Weight
from common.model.quant_int8 import Int8Weight
from common.model.weights import load_checkpoint, save_checkpoint


def _weight(rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)) * 0.05


def test_int8_error_is_within_half_a_step_and_product_matches_reference():
    w = _weight(ROW_CHUNK + 300, 64)  # more rows than one CPU chunk
    packed = Int8Weight.pack(w)
    assert packed.qweight.dtype == torch.int8 and packed.qweight.abs().max() <= 127
    step = w.abs().amax(dim=1, keepdim=True) / 127
    assert ((packed.dequantize_rows() - w).abs() <= step / 2 + 1e-7).all()
    x = torch.randn(3, 64)
    torch.testing.assert_close(packed.matmul(x), int8_matmul_reference(x, packed.qweight, packed.scales),
                               atol=1e-5, rtol=1e-5)


def test_int4_recovers_weights_built_from_its_own_grid_including_a_short_last_group():
    rows, cols, group = 8, 72, 32  # groups of 32, 32 and 8
    gen = torch.Generator().manual_seed(1)
    codes = torch.randint(0, 16, (rows, cols), generator=gen)
    codes[:, 0], codes[:, 1] = 0, 15  # every group spans the whole grid, so packing finds its scale and min
    codes[:, 32], codes[:, 33], codes[:, 64], codes[:, 65] = 0, 15, 0, 15
    scales = (torch.rand(rows, 3, generator=gen) * 0.01 + 0.001).half().float()
    mins = (-torch.rand(rows, 3, generator=gen) * 0.05).half().float()
    group_of = torch.arange(cols) // group
    w = codes * scales[:, group_of] + mins[:, group_of]
    packed = Int4Weight.pack(w, group)
    torch.testing.assert_close(packed.dequantize_rows(), w, atol=1e-6, rtol=0)


@pytest.mark.parametrize("cols,group", [(128, 32), (96, 64), (576, 128)])
def test_int4_error_bound_and_product_against_the_kernel_reference(cols, group):
    w = _weight(40, cols, seed=2)
    packed = Int4Weight.pack(w, group)
    assert packed.packed.shape == (40, cols // 2) and packed.scales.shape == (40, -(-cols // group))
    step = packed.scales.float().repeat_interleave(group, dim=1)[:, :cols]
    assert ((packed.dequantize_rows() - w).abs() <= step / 2 + 1e-4 * step + 1e-6).all()
    x = torch.randn(5, cols)
    expected = int4_matmul_reference(x, packed.packed, packed.scales, packed.mins, group)
    torch.testing.assert_close(packed.matmul(x), expected, atol=1e-5, rtol=1e-5)


def test_fp8_relative_error_is_that_of_three_mantissa_bits():
    w = _weight(16, 64, seed=3)
    packed = Fp8Weight.pack(w)
    assert packed.data.dtype == torch.float8_e4m3fn
    dq = packed.dequantize_rows()
    normal = w.abs() > packed.scales[:, None] * 2.0**-6  # e4m3's smallest normal, scaled
    assert ((dq - w).abs()[normal] <= w.abs()[normal] * 2.0**-4 + 1e-9).all()
    x = torch.randn(2, 64)
    torch.testing.assert_close(packed.matmul(x), F.linear(x, dq), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cast_formats_store_half_the_bytes_and_compute_in_fp32(dtype):
    w = _weight(10, 32, seed=4)
    packed = CastWeight.pack(w, dtype)
    assert packed.nbytes == w.numel() * 2
    x = torch.randn(3, 32)
    out = packed.matmul(x)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, F.linear(x, w.to(dtype).float()), atol=1e-6, rtol=1e-6)


PACKERS = {"int8": Int8Weight.pack, "int4": lambda w: Int4Weight.pack(w, 32), "fp8": Fp8Weight.pack,
           "fp16": lambda w: CastWeight.pack(w, torch.float16)}


@pytest.mark.parametrize("kind", sorted(PACKERS))
def test_packed_weights_concatenate_gather_and_move_like_tensors(kind):
    pack = PACKERS[kind]
    a, b = _weight(6, 64, seed=5), _weight(10, 64, seed=6)
    joined = torch.cat([pack(a), pack(b)])  # as LlamaModel joins q/k/v
    torch.testing.assert_close(joined.dequantize_rows(), torch.cat([pack(a).dequantize_rows(),
                                                                    pack(b).dequantize_rows()]))
    ids = torch.tensor([[3, 15], [0, 7]])
    torch.testing.assert_close(joined[ids], joined.dequantize_rows()[ids])  # as LlamaModel embeds tokens
    torch.testing.assert_close(F.embedding(ids, joined), joined.dequantize_rows()[ids])
    moved = joined.to("cpu", torch.float64)
    assert moved.dequantize_rows().dtype == torch.float64 and moved.nbytes == joined.nbytes


def test_registry_builds_dense_and_packed_linears_and_refuses_uncalibrated_awq():
    w = _weight(8, 64, seed=7)
    assert isinstance(make_linear(w, "fp32"), DenseLinear)
    assert isinstance(make_linear(w, "int8"), PackedLinear)
    for calibrated in ("int4-awq", "int4-gptq", "int4"):
        with pytest.raises(ValueError, match="calibrated"):
            make_linear(w, calibrated)
    with pytest.raises(ValueError, match="unknown"):
        make_linear(w, "int3")
    assert WEIGHT_FORMATS["int4"] is WEIGHT_FORMATS["int4-gptq-g128"] and WEIGHT_FORMATS["int4-awq-g32"].calibrated
    assert not WEIGHT_FORMATS["int4-g128"].calibrated  # round to nearest, by name


def test_checkpoint_round_trip_keeps_every_packed_tensor(tmp_path):
    weights = {"model.norm.weight": torch.ones(64), "model.layers.0.mlp.down_proj.weight": Int4Weight.pack(_weight(8, 64), 32),
               "model.embed_tokens.weight": Int8Weight.pack(_weight(20, 64, seed=8)),
               "model.layers.0.self_attn.o_proj.weight": Fp8Weight.pack(_weight(64, 64, seed=9))}
    path = tmp_path / "quantized" / "x.safetensors"
    save_checkpoint(path, weights, "int4-g32", "digest")
    loaded = load_checkpoint(path)
    assert loaded.keys() == weights.keys()
    for name, weight in weights.items():
        if isinstance(weight, torch.Tensor):
            assert torch.equal(loaded[name], weight)
            continue
        assert type(loaded[name]) is type(weight) and loaded[name].meta() == weight.meta()
        for field, tensor in weight.tensors().items():
            assert torch.equal(loaded[name].tensors()[field].view(torch.uint8), tensor.view(torch.uint8)), field
