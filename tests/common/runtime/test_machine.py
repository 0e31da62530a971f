"""Which machine made a figure: the facts every summary carries, the one line logs and reports print, and
`pdserve eval`'s output saying it."""

import json
import logging
from argparse import Namespace

import pytest
import torch

from common.fidelity.harness import ConfigResult
from common.runtime.machine import describe_machine, machine_facts
from pdserve.eval import run as harness

FACT_TYPES = {"cpu": str, "cpu_capability": str, "cpu_flags": list, "avx512_bf16": bool, "avx512_vnni": bool,
              "amx": bool, "cores": int, "gpu": (str, type(None)), "torch": str, "python": str}


def test_facts_have_every_key_with_its_type_and_survive_json():
    facts = machine_facts()
    assert set(facts) == set(FACT_TYPES)
    for key, kind in FACT_TYPES.items():
        assert isinstance(facts[key], kind), f"{key}: {facts[key]!r}"
    assert facts["cpu"] and facts["cores"] >= 1
    assert facts["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert facts["torch"] == torch.__version__
    assert (facts["gpu"] is not None) == torch.cuda.is_available()
    assert json.loads(json.dumps(facts)) == facts


def test_flags_agree_with_the_booleans():
    facts = machine_facts()
    assert facts["avx512_bf16"] == ("avx512_bf16" in facts["cpu_flags"])
    assert facts["avx512_vnni"] == ("avx512_vnni" in facts["cpu_flags"])
    assert facts["amx"] == any(flag.startswith("amx") for flag in facts["cpu_flags"])


def test_the_line_names_the_cpu_its_kernel_level_and_the_gpu():
    facts, line = machine_facts(), describe_machine()
    assert "\n" not in line
    assert facts["cpu"] in line and f"torch CPU capability {facts['cpu_capability']}" in line
    assert (f"GPU {facts['gpu']}" if facts["gpu"] else "no GPU") in line


def test_eval_prints_the_machine_above_its_table_and_writes_the_facts(tmp_path, monkeypatch, capsys):
    result = ConfigResult(weights="fp32", weight_bytes=4, perplexity=10.0, ppl_increase=0.0, top1_agreement=1.0,
                          mean_kl=0.0, accuracy={}, seconds=1.0)
    monkeypatch.setattr(harness, "load_suites", lambda directory, only: [])
    monkeypatch.setattr(harness, "evaluate", lambda model, formats, suites, gate, **_: [result])
    args = Namespace(threads=torch.get_num_threads(), suites=tmp_path, only=None, max_ppl_increase=None,
                     min_agreement=None, min_accuracy=[], model=tmp_path, weights=None, json=tmp_path / "eval.json")
    assert harness.run_from_args(args) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"Machine: {describe_machine()}" and lines[2].startswith("| weights |")
    assert json.loads(args.json.read_text())["machine_facts"] == machine_facts()


def test_a_tier_logs_the_machine_before_it_loads_anything(tmp_path, caplog):
    from common.basics.config import TierConfig
    from common.runtime.tier import build_runtime

    # No model in tmp_path: start-up stops right after the machine line.
    with caplog.at_level(logging.INFO, logger="common.runtime.tier"), pytest.raises(FileNotFoundError):
        build_runtime(TierConfig(model_dir=tmp_path, threads=torch.get_num_threads()))
    assert f"machine: {describe_machine()}" in caplog.messages


def test_bench_and_trilemma_line_adds_the_load_to_the_machine():
    from pdserve.bench.runner import machine_description

    line = machine_description()
    assert line.startswith(describe_machine()) and "threads per process as pinned" in line
    assert "load average" in line and "\n" not in line
