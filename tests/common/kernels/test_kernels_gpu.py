"""The Triton kernels compiled for a CUDA device against their torch references, and the default model's
decode through the paged kernel against the torch path (skipped without CUDA).

The checks run in a fresh process: the interpreter tests set TRITON_INTERPRET, which triton reads when a
kernel is defined, so compiled kernels need a process of their own."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.kernels, pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def test_compiled_kernels_match_references_on_cuda(model_dir):
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    script = Path(__file__).with_name("compiled_on_cuda.py")
    result = subprocess.run([sys.executable, str(script), str(model_dir)], env=env, capture_output=True, text=True,
                            timeout=600, cwd=Path(__file__).resolve().parents[3])
    assert result.returncode == 0, result.stdout + result.stderr
