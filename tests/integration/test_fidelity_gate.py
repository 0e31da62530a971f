"""The fidelity gate at a tier's start-up: a format that regresses past the flags never serves."""

import subprocess
import sys

from common.fidelity.gate import check_startup_fidelity


def test_decode_tier_refuses_int4_g128_under_a_ten_percent_perplexity_gate(model_dir):
    # docs/fidelity.md: int4-g128 (round-to-nearest) raises perplexity by ~86 % on this model
    done = subprocess.run([sys.executable, "-m", "pdserve.cli", "decode", "--model", str(model_dir), "--port", "0",
                           "--metrics-port", "0", "--weights", "int4-g128", "--fidelity-max-ppl-increase", "0.1"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "refusing to serve: fidelity gate failed (perplexity +" in done.stderr
    assert "int4-g128" in done.stderr and "Choose a more faithful --weights format" in done.stderr


def test_a_faithful_format_passes_the_same_gate(model_dir):
    check_startup_fidelity(model_dir, "fp16", max_ppl_increase=0.1, min_agreement=0.9)  # raises on failure
