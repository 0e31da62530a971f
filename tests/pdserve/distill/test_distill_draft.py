"""`pdserve distill-draft` end to end on a tiny budget: the target writes text, a one-layer draft trains on
it, and the checkpoint it saves is one the decode tier accepts as a draft and whose logits the serving
model reproduces exactly (the training model and LlamaModel compute the same function)."""

import json
import subprocess
import sys

import torch

from common.basics.model_config import ModelConfig
from common.kv.pool import KvPool
from common.model.draft_head import HEAD_FILE
from common.model.runner import ModelRunner, PrefillChunk
from common.model.weights import load_dense, load_model
from decode_svc.draft_check import check_draft_matches
from pdserve.distill.student import StudentLlama


def test_a_short_distillation_saves_a_draft_that_learned_and_loads(model_dir, tmp_path):
    out = tmp_path / "draft"
    # A child process, as the command runs: the CLI sets OMP_WAIT_POLICY before torch loads (in this process
    # torch is loaded already, and spinning OpenMP threads beside other work made each step seconds long).
    # Counts, not the clock, end each stage: 6 answers, 40 steps, well inside a 10-minute budget on any machine.
    subprocess.run([sys.executable, "-m", "pdserve.cli", "distill-draft", "--model", str(model_dir), "--out", str(out),
                    "--minutes", "10", "--layers", "1", "--batch-size", "4", "--max-new-tokens", "16",
                    "--max-answers", "6", "--max-steps", "40", "--head-tokens", "1024", "--batch-tokens", "512"],
                   check=True, timeout=600)
    report = json.loads((out / "distill" / "report.json").read_text())
    assert report["corpus"]["answers"] == 6 and report["training"]["steps"] == 40
    assert report["held_out_after"]["loss"] < report["held_out_before"]["loss"]
    check_draft_matches(model_dir, out)  # the target's tokenizer files came along
    assert ModelConfig.from_dir(out).num_layers == 1
    assert len(json.loads((out / HEAD_FILE).read_text())["token_ids"]) == 1024


def test_the_training_model_computes_what_the_serving_model_computes(model_dir, tmp_path):
    config = ModelConfig.from_dir(model_dir)
    student = StudentLlama.from_target(load_dense(model_dir), config, [0, 29], torch.arange(config.vocab_size))
    student.save(tmp_path, model_dir, {})
    served = load_model(tmp_path)
    kv = KvPool(num_layers=2, num_blocks=4, block_size=16, num_kv_heads=config.num_kv_heads,
                head_dim=config.head_dim, dtype=torch.float32)
    ids = list(range(200, 240))
    expected = ModelRunner(served, kv).run_prefill([PrefillChunk(ids, 0, [2, 0, 3])])[0]  # (vocab,)
    with torch.no_grad():
        got = student.head_logits(student.hidden(torch.tensor([ids]))[0, -1:])[0]
    assert torch.allclose(got, expected, atol=1e-4)
