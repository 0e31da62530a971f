"""The compatibility fingerprint: prefill and decode tiers exchange KV only when theirs are equal."""

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

from common.basics.model_config import ModelConfig

_HASH_CHUNK_BYTES = 16 * 1024 * 1024


@dataclass(frozen=True)
class Compat:
    model_id: str
    weights_digest: str
    kv_dtype: str
    block_size: int
    num_layers: int
    num_kv_heads: int
    head_dim: int

    @property
    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()

    def differences(self, other: "Compat") -> list[str]:
        """Human-readable list of fields that differ, e.g. ["kv_dtype: float32 here, float16 there"]."""
        mine, theirs = asdict(self), asdict(other)
        return [f"{key}: {mine[key]} here, {theirs[key]} there" for key in mine if mine[key] != theirs[key]]


def weights_digest(model_dir: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(model_dir.glob("*.safetensors")):
        with path.open("rb") as f:
            while chunk := f.read(_HASH_CHUNK_BYTES):
                digest.update(chunk)
    return digest.hexdigest()


def compat_for(model_dir: Path, config: ModelConfig, *, kv_dtype: str, block_size: int) -> Compat:
    return Compat(
        model_id=model_dir.name,
        weights_digest=weights_digest(model_dir),
        kv_dtype=kv_dtype,
        block_size=block_size,
        num_layers=config.num_layers,
        num_kv_heads=config.num_kv_heads,
        head_dim=config.head_dim,
    )
