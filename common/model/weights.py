"""A tier's weights in its chosen format: quantised once, saved beside the model, reloaded at every start.

    load_model(model_dir, "int4-awq")  ->  LlamaModel whose projections are int4 (AWQ-scaled), embedding int8

A mixture-of-experts checkpoint's experts are split into one weight per expert projection as they load
(common/model/moe.py's split_experts), so every format packs each expert on its own; AWQ formats refuse MoE.

The checkpoint is `<model_dir>/quantized/<format>.safetensors`: packed tensors named `<weight>:<field>`,
and a metadata marker (layout version, format, the source weights' digest, each packed weight's kind and
layout). A checkpoint whose marker does not match the format, the layout version or the source weights is
ignored and rebuilt. Formats that only cast (fp16, bf16) are not saved: casting is as fast as loading.
"""

import json
import os
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from common.basics.compat import weights_digest
from common.basics.model_config import ModelConfig
from common.model.linear import WeightFormat, weight_format
from common.model.llama import LlamaModel
from common.model.moe import split_experts
from common.model.packed import PackedWeight
from common.model.quant_cast import CastWeight
from common.model.quant_fp8 import Fp8Weight
from common.model.quant_int4 import Int4Weight
from common.model.quant_int8 import Int8Weight

LAYOUT_VERSION = "2"  # 2: AWQ clips its ranges (checkpoints of 1 are rebuilt)
EMBEDDING_NAMES = ("model.embed_tokens.weight", "lm_head.weight")
PACKED_KINDS: dict[str, type[PackedWeight]] = {cls.kind: cls for cls in (CastWeight, Fp8Weight, Int8Weight, Int4Weight)}


def checkpoint_path(model_dir: Path, format_name: str) -> Path:
    return model_dir / "quantized" / f"{format_name}.safetensors"


def load_dense(model_dir: Path) -> dict[str, torch.Tensor]:
    weights: dict[str, torch.Tensor] = {}
    for path in sorted(model_dir.glob("*.safetensors")):
        weights.update(load_file(str(path)))
    return split_experts(weights)


def pack_weights(weights: dict[str, torch.Tensor], fmt: WeightFormat) -> dict[str, torch.Tensor | PackedWeight]:
    """Projections in the format's packing, the embedding / LM head in its embedding packing, norms as they are."""
    packed: dict[str, torch.Tensor | PackedWeight] = {}
    for name, tensor in weights.items():
        if name in EMBEDDING_NAMES:
            packed[name] = fmt.pack_embedding(tensor)
        elif name.endswith("_proj.weight"):
            packed[name] = fmt.pack(tensor)
        else:
            packed[name] = tensor
    return packed


def save_checkpoint(path: Path, weights: dict[str, torch.Tensor | PackedWeight], format_name: str,
                    source_digest: str, recipe: str = "") -> None:
    tensors, layouts = {}, {}
    for name, weight in weights.items():
        if isinstance(weight, PackedWeight):
            layouts[name] = {"kind": weight.kind, **weight.meta()}
            tensors.update({f"{name}:{field}": t.contiguous() for field, t in weight.tensors().items()})
        else:
            tensors[name] = weight.contiguous()
    metadata = {"pdserve_layout_version": LAYOUT_VERSION, "pdserve_weight_format": format_name,
                "source_digest": source_digest, "recipe": recipe, "packed": json.dumps(layouts)}
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f"{path.name}.{os.getpid()}.partial")
    save_file(tensors, str(partial), metadata=metadata)
    os.replace(partial, path)  # atomic: tiers starting side by side never read half a file


def read_marker(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return f.metadata() or {}


def load_checkpoint(path: Path) -> dict[str, torch.Tensor | PackedWeight]:
    layouts = json.loads(read_marker(path)["packed"])
    flat = load_file(str(path))
    weights: dict[str, torch.Tensor | PackedWeight] = {k: v for k, v in flat.items() if ":" not in k}
    for name, layout in layouts.items():
        cls = PACKED_KINDS[layout.pop("kind")]
        fields = {key.split(":", 1)[1]: t for key, t in flat.items() if key.split(":", 1)[0] == name}
        weights[name] = cls(compute_dtype=torch.float32, **layout, **fields)
    return weights


def _checkpoint_matches(path: Path, format_name: str, source_digest: str, recipe: str) -> bool:
    if not path.exists():
        return False
    marker = read_marker(path)
    return (marker.get("pdserve_layout_version") == LAYOUT_VERSION
            and marker.get("pdserve_weight_format") == format_name
            and marker.get("source_digest") == source_digest
            and marker.get("recipe", "") == recipe)


def recipe_digest(fmt: WeightFormat) -> str:
    """What a calibrated checkpoint was computed from besides the weights: its method and calibration data
    (a change to either rebuilds it); empty for formats that need no calibration."""
    if not fmt.calibrated:
        return ""
    from common.model.calibration import calibration_digest

    return f"{fmt.method}:{calibration_digest(fmt.method)}"


def prepare_weights(model_dir: Path, format_name: str, *, save: bool = True,
                    source_digest: str | None = None) -> dict[str, torch.Tensor | PackedWeight]:
    """The format's weights for model_dir: the saved checkpoint when it matches, else computed (and saved)."""
    fmt = weight_format(format_name)
    if not fmt.saved:
        return pack_weights(load_dense(model_dir), fmt)
    path = checkpoint_path(model_dir, fmt.name)
    digest = source_digest or weights_digest(model_dir)
    recipe = recipe_digest(fmt)
    if _checkpoint_matches(path, fmt.name, digest, recipe):
        return load_checkpoint(path)
    packed = calibrated_weights(model_dir, fmt) if fmt.calibrated else pack_weights(load_dense(model_dir), fmt)
    if save:
        try:
            save_checkpoint(path, packed, fmt.name, digest, recipe)
        except OSError as error:  # a read-only model volume: serve anyway, say why the next start repeats this
            print(f"pdserve: cannot save the {fmt.name} checkpoint at {path} ({error}); "
                  "run `pdserve quantize` where the model directory is writable", file=sys.stderr)
    return packed


def calibrated_weights(model_dir: Path, fmt: WeightFormat) -> dict[str, torch.Tensor | PackedWeight]:
    """AWQ: scales folded and ranges clipped, then packed to nearest; GPTQ: packed by GPTQ itself."""
    from common.model.calibration import calibration_token_ids, check_supported

    config = ModelConfig.from_dir(model_dir)
    check_supported(config, fmt)  # before loading and tokenising anything
    if fmt.method == "awq":
        from common.model.awq import apply_awq

        return pack_weights(apply_awq(config, load_dense(model_dir), calibration_token_ids(model_dir), fmt), fmt)
    from common.model.gptq import apply_gptq

    return apply_gptq(config, load_dense(model_dir), calibration_token_ids(model_dir, generated=True), fmt)


def load_model(model_dir: Path, format_name: str = "fp32", device: torch.device | str = "cpu",
               dtype: torch.dtype = torch.float32, *, source_digest: str | None = None) -> LlamaModel:
    weights = prepare_weights(model_dir, format_name, source_digest=source_digest)
    return LlamaModel(ModelConfig.from_dir(model_dir), weights, dtype, device, weight_format=format_name)


def stored_weight_bytes(model: LlamaModel) -> dict[str, int]:
    """Bytes the model holds for its weights, each tensor counted once (a tied LM head shares the embedding):
    {"embedding", "lm_head" (when tied and shared: 0, or a blocked copy's bytes), "layers" (projections,
    routers and norms), "total"}. Blocked copies (LlamaModel.add_blocked_copies) count as held."""
    embed = model.embed
    embedding = embed.nbytes if isinstance(embed, PackedWeight) else embed.numel() * embed.element_size()
    head = model.lm_head.weight
    lm_head = model.lm_head.nbytes - (embedding if head is embed else 0)  # tied: only a blocked copy's bytes
    layers = model.final_norm.numel() * model.final_norm.element_size()
    for layer in model.layers:
        layers += layer.qkv.nbytes + layer.out.nbytes + layer.mlp.nbytes
        layers += (layer.input_norm.numel() + layer.post_norm.numel()) * layer.input_norm.element_size()
    return {"embedding": embedding, "lm_head": lm_head, "layers": layers, "total": embedding + lm_head + layers}
