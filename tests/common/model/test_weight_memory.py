"""A loaded model keeps no view of its checkpoint's memory map: once the projections are copied out (transposed,
cast or packed), a single norm left as a view would keep the whole file mapped and counted in the tier's resident
memory (513 MiB for the default model, beside the weights it actually serves). Measured in a fresh process, as a
tier is: other tests' models (transformers maps the same file) would otherwise be counted too."""

import subprocess
import sys
from pathlib import Path

import pytest

_MEASURE = """
import gc, sys
from pathlib import Path
from common.model.weights import load_model
model_dir, weights = Path(sys.argv[1]), sys.argv[2]
model = load_model(model_dir, weights)
model.add_blocked_copies()
gc.collect()
checkpoint, current, mapped = str((model_dir / "model.safetensors").resolve()), None, 0
for line in open("/proc/self/smaps"):
    fields = line.split()
    if "-" in fields[0] and len(fields) >= 5:
        current = fields[5] if len(fields) > 5 else None
    elif fields[0] == "Rss:" and current == checkpoint:
        mapped += int(fields[1])
norm = model.final_norm
print(mapped, norm.untyped_storage().nbytes() == norm.numel() * norm.element_size())
"""


@pytest.mark.parametrize("weights", ["fp32", "bf16"])
def test_no_view_of_the_checkpoint_outlives_loading(model_dir, weights):
    root = Path(__file__).resolve().parents[3]
    result = subprocess.run([sys.executable, "-c", _MEASURE, str(model_dir), weights], capture_output=True, text=True,
                            timeout=300, cwd=root)
    assert result.returncode == 0, result.stderr
    mapped_kib, norm_owns_its_memory = result.stdout.split()
    assert int(mapped_kib) == 0  # resident KiB of the checkpoint's mappings
    assert norm_owns_its_memory == "True"
