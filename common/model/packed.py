"""Weights kept in a compact format that stand in for a dense (out_features, in_features) tensor.

LlamaModel builds itself from a dict of tensors: it moves each with `.to(device, dtype)`, joins q/k/v and
gate/up with `torch.cat`, gathers embedding rows with `embed[token_ids]`, and hands every projection to
make_linear. A PackedWeight answers exactly those, so a quantised checkpoint goes straight into the model
without a dense copy, and a tied embedding is stored once for both the lookup and the LM head.

Every tensor field of a PackedWeight has the weight's rows as its first dimension, so concatenating, moving
and gathering rows is one generic operation per field; a subclass only says how its rows dequantise.
"""

import dataclasses
from typing import ClassVar

import torch
import torch.nn.functional as F

# Rows dequantised at a time on CPU: the temporary stays in cache and the multiply reads it from there
# (measured faster than dequantising the whole matrix, and faster than fp32 for the 49,152-row LM head).
ROW_CHUNK = 1024


@dataclasses.dataclass(eq=False)
class PackedWeight:
    kind: ClassVar[str]  # name in checkpoints
    in_features: int
    compute_dtype: torch.dtype  # what dequantised rows and products come out as

    def dequantize_rows(self, rows: slice | torch.Tensor = slice(None)) -> torch.Tensor:
        """Rows (n, in_features) in compute_dtype."""
        raise NotImplementedError

    def matmul_cuda(self, x: torch.Tensor) -> torch.Tensor:
        """x (tokens, in_features) on a CUDA device -> (tokens, out_features); a fused kernel where one exists."""
        return F.linear(x, self.dequantize_rows().to(x.dtype))

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """F.linear(x, W) for x (..., in_features)."""
        flat = x.reshape(-1, self.in_features)
        if flat.is_cuda:
            out = self.matmul_cuda(flat)
        else:
            out = torch.empty(flat.shape[0], self.shape[0], dtype=x.dtype, device=x.device)
            for start in range(0, self.shape[0], ROW_CHUNK):
                rows = slice(start, start + ROW_CHUNK)
                torch.matmul(flat, self.dequantize_rows(rows).to(x.dtype).T, out=out[:, rows])
        return out.view(*x.shape[:-1], self.shape[0])

    # --- what the model and the checkpoint store need --------------------------------------------------

    def tensors(self) -> dict[str, torch.Tensor]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if isinstance(getattr(self, f.name), torch.Tensor)}

    def meta(self) -> dict:
        """The non-tensor fields a checkpoint must keep (compute_dtype is the loader's choice)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if f.name != "compute_dtype" and not isinstance(getattr(self, f.name), torch.Tensor)}

    @property
    def shape(self) -> tuple[int, int]:
        return next(iter(self.tensors().values())).shape[0], self.in_features

    @property
    def device(self) -> torch.device:
        return next(iter(self.tensors().values())).device

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    def _with(self, **changes) -> "PackedWeight":
        return dataclasses.replace(self, **changes)

    def to(self, *args, **kwargs) -> "PackedWeight":
        """Moves the stored tensors to a device (their formats stay); a dtype sets compute_dtype."""
        device = kwargs.get("device")
        dtype = kwargs.get("dtype", self.compute_dtype)
        for arg in args:
            if isinstance(arg, torch.dtype):
                dtype = arg
            elif arg is not None:
                device = arg
        moved = {name: t.to(device) for name, t in self.tensors().items()} if device is not None else {}
        return self._with(compute_dtype=dtype, **moved)

    def __getitem__(self, ids: torch.Tensor) -> torch.Tensor:
        """Embedding lookup: rows at ids (any shape) -> (*ids.shape, in_features)."""
        return self.dequantize_rows(ids.reshape(-1)).view(*ids.shape, self.in_features)

    @classmethod
    def cat(cls, parts: list["PackedWeight"]) -> "PackedWeight":
        first = parts[0]
        if any(type(p) is not type(first) or p.meta() != first.meta() for p in parts):
            raise ValueError("only weights of one packed format and layout can be concatenated")
        return first._with(**{name: torch.cat([p.tensors()[name] for p in parts]) for name in first.tensors()})

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.cat:
            dim = kwargs.get("dim", args[1] if len(args) > 1 else 0)
            if dim != 0:
                raise ValueError("packed weights concatenate along their rows (dim 0) only")
            return cls.cat(list(args[0]))
        if func is F.embedding:
            return args[1][args[0]]
        return NotImplemented


def replicate_pad_columns(weight: torch.Tensor, multiple: int) -> torch.Tensor:
    """Pads (rows, cols) to a multiple of `multiple` columns by repeating the last column, so a short last
    group's minimum and maximum are those of its real elements."""
    missing = -weight.shape[1] % multiple
    if not missing:
        return weight
    return torch.cat([weight, weight[:, -1:].expand(-1, missing)], dim=1)
