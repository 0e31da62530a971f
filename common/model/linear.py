"""Linear layers of the model, one class per way of storing a weight, chosen by name in one registry.

The model only calls `layer(x)`. A WeightFormat says how a tier stores its weights: projections in one
format, the embedding (tied to the LM head on the default model) in another, norms as they are. Building a
layer from a dense tensor packs it on the spot; building it from a PackedWeight (a checkpoint saved by
common/model/weights.py) uses it as it is. AWQ formats need calibration, so they only accept packed weights.
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch

from common.model.packed import PackedWeight
from common.model.quant_cast import CastWeight
from common.model.quant_fp8 import Fp8Weight
from common.model.quant_int4 import Int4Weight
from common.model.quant_int8 import Int8Weight


class DenseLinear:
    """x @ W^T with W held transposed, (in_features, out_features) contiguous: on the CPUs here MKL's
    product of one row (batch-1 decode) runs fastest against that layout.

    `add_blocked_copy` adds a second copy in oneDNN's blocked layout for products of two rows or more
    (verification of speculated tokens, batched decode, prefill): a step verifying 4 drafts (5 rows) costs
    1.56 one-row steps with it, 2.33 without, and a batch-4 step is 1.4x faster
    (scripts/micro/blocked_weights.py), at twice the weight memory."""

    def __init__(self, weight: torch.Tensor) -> None:
        self.weight_t = weight.t().contiguous()  # (in_features, out_features)
        self.weight = self.weight_t.t()  # (out_features, in_features), a view: no second copy
        self.blocked: torch.Tensor | None = None  # oneDNN-blocked (out_features, in_features), or none

    def add_blocked_copy(self) -> bool:
        """Adds the blocked copy where oneDNN can run it (float32 on CPU); returns whether it did."""
        if not blocked_layout_available(self.weight_t):
            return False
        self.blocked = torch.ops.mkldnn._reorder_linear_weight(self.weight, 16)  # sized for ~16 rows
        return True

    def drop_copy(self) -> None:
        """Back to the one plain copy (what add_blocked_copy added is freed)."""
        self.blocked = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.blocked is not None and x.numel() > x.shape[-1]:
            return torch.ops.mkldnn._linear_pointwise(x, self.blocked, None, "none", [], "")
        return x @ self.weight_t

    @property
    def in_features(self) -> int:
        return self.weight_t.shape[0]

    @property
    def nbytes(self) -> int:
        copies = 1 if self.blocked is None else 2
        return copies * self.weight_t.numel() * self.weight_t.element_size()


def blocked_layout_available(weight: torch.Tensor) -> bool:
    return (weight.device.type == "cpu" and weight.dtype == torch.float32 and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight"))


class PackedLinear:
    """x @ W^T for a PackedWeight, dequantised row chunk by row chunk on CPU unless a CPU copy serves.

    `add_blocked_copy` gives an fp16 weight with fp32 products on CPU a second copy packed for FBGEMM's fp16
    matrix product (torch.ops.quantized.linear_dynamic_fp16: fp16 weights widened in registers, fp32
    activations and sums), reading half of fp32's bytes. Against fp32 with its blocked copy, a batch-1 step
    takes 27.9 ms instead of 35.9, verifying 4 drafts 35.6 instead of 63.1, and a 256-token prefill chunk is
    1.12x faster (scripts/micro/fp16_weights.py). Once the copy exists, `drop_unpacked` frees the fp16 weight.

    A bf16 weight gets a copy in oneDNN's blocked layout instead, where the CPU has bf16 dot-product units
    (AVX-512 BF16 or AMX): each product rounds its fp32 activations to bf16 and sums in fp32 (as a GPU's bf16
    matmul does), reading half of fp32's bytes at twice its multiply rate."""

    def __init__(self, weight: PackedWeight) -> None:
        self.weight: PackedWeight | None = weight  # None once drop_unpacked() leaves the packed copy alone
        self.in_features, self.out_features = weight.in_features, weight.shape[0]
        self.fp16_packed = None  # FBGEMM's packed fp16 matrix, or none
        self.bf16_blocked: torch.Tensor | None = None  # oneDNN-blocked bf16 matrix, or none

    def add_blocked_copy(self) -> bool:
        """Adds the FBGEMM fp16 copy, or the oneDNN bf16 copy, where it computes this weight's product; returns
        whether it did."""
        if self.weight is None:
            return False
        if fp16_gemm_available(self.weight):
            self.fp16_packed = torch.ops.quantized.linear_prepack_fp16(self.weight.dequantize_rows(), None)
            return True
        if bf16_gemm_available(self.weight):
            self.bf16_blocked = torch.ops.mkldnn._reorder_linear_weight(self.weight.data, 16)
            return True
        return False

    @property
    def has_copy(self) -> bool:
        return self.fp16_packed is not None or self.bf16_blocked is not None

    def drop_copy(self) -> None:
        """Back to the unpacked weight alone (only while it is still held: see drop_unpacked)."""
        if self.weight is None:
            raise ValueError("the unpacked weight was dropped: the packed copy is all this linear holds")
        self.fp16_packed = self.bf16_blocked = None

    def drop_unpacked(self) -> bool:
        """Frees the unpacked weight where the packed copy serves every product; returns whether it did. Not
        for a weight whose rows are also looked up (a tied embedding): the packed copy cannot give rows."""
        if not self.has_copy:
            return False
        self.weight = None
        return True

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if not self.has_copy:
            return self.weight.matmul(x)
        flat = x if x.dim() == 2 else x.reshape(-1, self.in_features)  # (tokens, in_features)
        if self.fp16_packed is not None:
            out = torch.ops.quantized.linear_dynamic_fp16(flat, self.fp16_packed)
        else:
            out = torch.ops.mkldnn._linear_pointwise(flat.to(torch.bfloat16), self.bf16_blocked, None, "none", [],
                                                     "").to(x.dtype)
        return out if x.dim() == 2 else out.view(*x.shape[:-1], out.shape[-1])

    @property
    def nbytes(self) -> int:
        copy = self.out_features * self.in_features * 2 if self.has_copy else 0  # fp16 / bf16: 2 bytes each
        return (0 if self.weight is None else self.weight.nbytes) + copy


def fp16_gemm_available(weight: PackedWeight) -> bool:
    """An fp16 CastWeight computing in fp32 on CPU, in a torch built with FBGEMM."""
    return (isinstance(weight, CastWeight) and weight.data.dtype == torch.float16
            and weight.compute_dtype == torch.float32 and weight.device.type == "cpu"
            and "fbgemm" in torch.backends.quantized.supported_engines
            and hasattr(torch.ops.quantized, "linear_prepack_fp16"))


def bf16_gemm_available(weight: PackedWeight) -> bool:
    """A bf16 CastWeight computing in fp32 on a CPU with bf16 dot-product units, in a torch with oneDNN."""
    from common.runtime.machine import machine_facts

    facts = machine_facts()
    return (isinstance(weight, CastWeight) and weight.data.dtype == torch.bfloat16
            and weight.compute_dtype == torch.float32 and weight.device.type == "cpu"
            and (facts["avx512_bf16"] or facts["amx"]) and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight"))


Packer = Callable[[torch.Tensor], torch.Tensor | PackedWeight]


def _keep(weight: torch.Tensor) -> torch.Tensor:
    return weight


@dataclass(frozen=True)
class WeightFormat:
    name: str
    pack: Packer  # projections (q, k, v, o, gate, up, down)
    pack_embedding: Packer  # embedding / LM head rows
    saved: bool = False  # quantised once and kept as a checkpoint (casts are cheap to redo at start-up)
    method: str | None = None  # "awq" or "gptq": packing needs activations (common/model/calibration.py)
    group_size: int | None = None  # int4 formats

    @property
    def calibrated(self) -> bool:
        """Only checkpoints from common/model/weights.py are accepted: packing a lone tensor cannot calibrate."""
        return self.method is not None

    def __call__(self, weight: torch.Tensor | PackedWeight) -> DenseLinear | PackedLinear:
        if isinstance(weight, PackedWeight):
            return PackedLinear(weight)
        if self.calibrated:
            raise ValueError(f"weight format {self.name!r} is calibrated ({self.method}): load it with "
                             "common.model.weights.load_model, which calibrates once and saves a checkpoint")
        packed = self.pack(weight)
        return PackedLinear(packed) if isinstance(packed, PackedWeight) else DenseLinear(packed)


def _cast(dtype: torch.dtype) -> Packer:
    return lambda weight: CastWeight.pack(weight, dtype)


def _int4(group_size: int) -> Packer:
    return lambda weight: Int4Weight.pack(weight, group_size)


INT4_GROUP_SIZES = (32, 64, 128)
DEFAULT_INT4_GROUP_SIZE = 128
DEFAULT_INT4_METHOD = "gptq"  # `int4`: the int4 g128 quantiser that keeps the model best (docs/fidelity.md)


CALIBRATION_METHODS = ("awq", "gptq")


def _int4_formats() -> dict[str, WeightFormat]:
    formats = {}
    for group in INT4_GROUP_SIZES:
        # The embedding doubles as the LM head: int8 rows keep it close to fp32 at a quarter of its bytes.
        formats[f"int4-g{group}"] = WeightFormat(f"int4-g{group}", _int4(group), Int8Weight.pack, saved=True,
                                                 group_size=group)
        for method in CALIBRATION_METHODS:
            name = f"int4-{method}-g{group}"
            formats[name] = WeightFormat(name, _int4(group), Int8Weight.pack, saved=True, method=method,
                                         group_size=group)
    formats["int4"] = formats[f"int4-{DEFAULT_INT4_METHOD}-g{DEFAULT_INT4_GROUP_SIZE}"]
    for method in CALIBRATION_METHODS:
        formats[f"int4-{method}"] = formats[f"int4-{method}-g{DEFAULT_INT4_GROUP_SIZE}"]
    return formats


# format name -> how a tier stores its weights. "dense" keeps whatever dtype the model is built in.
WEIGHT_FORMATS: dict[str, WeightFormat] = {
    "dense": WeightFormat("dense", _keep, _keep),
    "fp32": WeightFormat("fp32", _keep, _keep),
    "fp16": WeightFormat("fp16", _cast(torch.float16), _cast(torch.float16)),
    "bf16": WeightFormat("bf16", _cast(torch.bfloat16), _cast(torch.bfloat16)),
    "fp8-e4m3": WeightFormat("fp8-e4m3", Fp8Weight.pack, Fp8Weight.pack, saved=True),
    "int8": WeightFormat("int8", Int8Weight.pack, Int8Weight.pack, saved=True),
    **_int4_formats(),
}


def weight_format(name: str) -> WeightFormat:
    found = WEIGHT_FORMATS.get(name)
    if found is None:
        raise ValueError(f"weight format {name!r} is unknown; expected one of {sorted(WEIGHT_FORMATS)}")
    return found


def make_linear(weight: torch.Tensor | PackedWeight, weight_format_name: str = "dense"):
    return weight_format(weight_format_name)(weight)
