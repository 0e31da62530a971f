"""The CLI sets up the process (OpenMP waiting policy) before torch loads, so it must not import torch."""

import subprocess
import sys

from common.basics.config import KV_DTYPES
from common.kv.wire import DTYPES


def test_cli_module_loads_without_torch():
    probe = "import sys, pdserve.cli; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "False"


def test_config_names_exactly_the_kv_dtypes_the_wire_knows():
    assert set(KV_DTYPES) == set(DTYPES)
