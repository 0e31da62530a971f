"""A loaded model keeps no view of its checkpoint's memory map: once the projections are copied out (transposed,
cast or packed), a single norm left as a view would keep the whole file mapped and counted in the tier's resident
memory (513 MiB for the default model, beside the weights it actually serves)."""

import gc
import os

import pytest

from common.model.weights import load_model


def _mapped_kib(path) -> int:
    """Resident KiB of this process's mappings of `path`."""
    total, current = 0, None
    with open(f"/proc/{os.getpid()}/smaps") as smaps:
        for line in smaps:
            fields = line.split()
            if "-" in fields[0] and len(fields) >= 5:
                current = fields[5] if len(fields) > 5 else None
            elif fields[0] == "Rss:" and current == str(path):
                total += int(fields[1])
    return total


@pytest.mark.parametrize("weights", ["fp32", "bf16"])
def test_no_view_of_the_checkpoint_outlives_loading(model_dir, weights):
    model = load_model(model_dir, weights)
    model.add_blocked_copies()
    gc.collect()
    checkpoint = (model_dir / "model.safetensors").resolve()
    assert _mapped_kib(checkpoint) == 0
    assert model.final_norm.untyped_storage().nbytes() == model.final_norm.numel() * model.final_norm.element_size()
