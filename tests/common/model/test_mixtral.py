"""A Mixtral checkpoint written by Hugging Face transformers, loaded by pdserve's loader and run over the paged
KV pool, against transformers' MixtralForCausalLM on the same weights: chunked prefill and batched decode
logits, expert load equal to the reference's routing, both expert layouts, and weight formats per expert."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tiny_mixtral import build_tiny_mixtral, hf_expert_counts

import common.model.weights as weights_module
from common.basics.model_config import ModelConfig
from common.kv.pool import KvPool
from common.model.linear import PackedLinear, weight_format
from common.model.moe import MoeMlp
from common.model.runner import DecodeItem, ModelRunner, PrefillChunk
from common.model.weights import checkpoint_path, load_model, stored_weight_bytes

ATOL = 1e-4
VOCAB = 320


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    model_dir = tmp_path_factory.mktemp("mixtral")
    return build_tiny_mixtral(model_dir, VOCAB), model_dir


def _runner(model) -> ModelRunner:
    c = model.config
    kv = KvPool(num_layers=c.num_layers, num_blocks=32, block_size=4, num_kv_heads=c.num_kv_heads,
                head_dim=c.head_dim, dtype=torch.float32)
    return ModelRunner(model, kv)


def _hf_logits(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]  # (tokens, vocab)


def _ids(seed: int, n: int) -> list[int]:
    return torch.randint(3, VOCAB, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def test_config_reads_mixtral_fields(tiny):
    hf, model_dir = tiny
    config = ModelConfig.from_dir(model_dir)
    assert (config.num_experts, config.num_experts_per_tok, config.is_moe) == (4, 2, True)
    assert config.rope_theta == hf.config.rope_parameters["rope_theta"] == 1e6  # transformers 5 writes rope_parameters
    with safe_open(str(model_dir / "model.safetensors"), "pt") as f:  # what save_pretrained writes today
        assert "model.layers.0.block_sparse_moe.experts.3.w2.weight" in f.keys()


@pytest.mark.parametrize("change,message", [
    ({"model_type": "qwen2_moe"}, "model_type 'qwen2_moe' is not supported"),
    ({"sliding_window": 16}, "sliding_window 16 is not supported"),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0}}, "plain rotary only"),
])
def test_config_refuses_what_the_model_cannot_run(tiny, tmp_path, change, message):
    raw = json.loads((tiny[1] / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**raw, **change}))
    with pytest.raises(ValueError, match=message):
        ModelConfig.from_dir(tmp_path)


def test_prefill_decode_and_expert_load_match_transformers(tiny):
    hf, model_dir = tiny
    runner = _runner(load_model(model_dir, "fp32"))
    prompts = [_ids(1, 13), _ids(2, 5), _ids(3, 9)]
    tables = [[9, 2, 17, 5], [30, 11], [20, 21, 22]]  # out of order, room for two more tokens
    first = runner.run_prefill([PrefillChunk(prompts[0][:6], 0, tables[0])])  # chunked: 6 tokens, then 7
    rest = runner.run_prefill([PrefillChunk(prompts[0][6:], 6, tables[0])] +
                              [PrefillChunk(ids, 0, table) for ids, table in zip(prompts[1:], tables[1:])])
    torch.testing.assert_close(first[0], _hf_logits(hf, prompts[0])[5], atol=ATOL, rtol=0)
    for row, ids in enumerate(prompts):
        torch.testing.assert_close(rest[row], _hf_logits(hf, ids)[-1], atol=ATOL, rtol=0)
    sequences = [list(ids) for ids in prompts]
    for step in range(2):  # two batched decode steps, sequences of different lengths
        next_ids = [7 + step, 40 + step, 99 + step]
        out = runner.run_decode([DecodeItem(tok, len(ids), table)
                                 for tok, ids, table in zip(next_ids, sequences, tables)])
        for row, tok in enumerate(next_ids):
            sequences[row].append(tok)
            torch.testing.assert_close(out[row], _hf_logits(hf, sequences[row])[-1], atol=ATOL, rtol=0)
    expected = [[0] * 4 for _ in range(2)]
    for ids in sequences:  # every token was routed once: prompts in prefill, the rest in decode steps
        for layer, counts in enumerate(hf_expert_counts(hf, ids, slice(None))):
            expected[layer] = [a + b for a, b in zip(expected[layer], counts)]
    assert runner.expert_load_counts() == expected
    assert all(sum(counts) == 2 * sum(map(len, sequences)) for counts in expected)


def test_transformers_fused_expert_layout_loads_the_same_model(tiny, tmp_path):
    hf, model_dir = tiny
    (tmp_path / "config.json").write_bytes((model_dir / "config.json").read_bytes())
    state = {k: v.contiguous() for k, v in hf.state_dict().items()}
    assert "model.layers.1.mlp.experts.gate_up_proj" in state  # (experts, 2 * intermediate, hidden)
    save_file(state, str(tmp_path / "model.safetensors"))
    ids = _ids(4, 11)
    logits = _runner(load_model(tmp_path, "fp32")).run_prefill([PrefillChunk(ids, 0, [0, 1, 2])])[0]
    torch.testing.assert_close(logits, _hf_logits(hf, ids)[-1], atol=ATOL, rtol=0)


def _dequantised_reference(hf, format_name: str):
    """transformers' model holding what the format keeps of every projection, expert by expert, and of the
    embedding and LM head; routers and norms stay fp32."""
    from transformers import MixtralForCausalLM

    fmt = weight_format(format_name)

    def dq(weight, pack=fmt.pack):
        return pack(weight).dequantize_rows()

    reference = MixtralForCausalLM(hf.config).eval()
    state = {}
    for name, tensor in hf.state_dict().items():
        if name.endswith("experts.gate_up_proj"):
            state[name] = torch.stack([torch.cat([dq(g), dq(u)]) for g, u in (e.chunk(2) for e in tensor)])
        elif name.endswith("experts.down_proj"):
            state[name] = torch.stack([dq(e) for e in tensor])
        elif name.endswith("_proj.weight"):
            state[name] = dq(tensor)
        elif name in ("model.embed_tokens.weight", "lm_head.weight"):
            state[name] = dq(tensor, fmt.pack_embedding)
        else:
            state[name] = tensor
    reference.load_state_dict(state)
    return reference


@pytest.mark.parametrize("format_name,packed_kind", [("int8", "int8"), ("int4-g32", "int4"), ("fp8-e4m3", "fp8-e4m3")])
def test_weight_format_applies_to_each_expert_and_its_checkpoint_reloads(tiny, monkeypatch, format_name,
                                                                          packed_kind):
    hf, model_dir = tiny
    model = load_model(model_dir, format_name)
    for layer in model.layers:
        assert isinstance(layer.mlp, MoeMlp) and len(layer.mlp.experts) == 4
        for expert in layer.mlp.experts:
            for linear in (expert.gate_up, expert.down):
                assert isinstance(linear, PackedLinear) and linear.weight.kind == packed_kind
        assert layer.mlp.router.dtype == torch.float32  # the router is never quantised
    fp32_layers = stored_weight_bytes(load_model(model_dir, "fp32"))["layers"]
    assert stored_weight_bytes(model)["layers"] < 0.35 * fp32_layers
    ids = _ids(5, 12)
    logits = _runner(model).run_prefill([PrefillChunk(ids, 0, [0, 1, 2])])[0]
    expected = _hf_logits(_dequantised_reference(hf, format_name), ids)[-1]
    torch.testing.assert_close(logits, expected, atol=ATOL, rtol=0)

    with safe_open(str(checkpoint_path(model_dir, format_name)), "pt") as f:
        assert "model.layers.1.mlp.experts.3.down_proj.weight:scales" in f.keys()

    def fail(*_):
        raise AssertionError("quantised again although the checkpoint matches")

    monkeypatch.setattr(weights_module, "pack_weights", fail)
    again = _runner(load_model(model_dir, format_name)).run_prefill([PrefillChunk(ids, 0, [0, 1, 2])])[0]
    torch.testing.assert_close(again, logits, atol=0, rtol=0)


@pytest.mark.parametrize("format_name", ["int4-awq", "int4-gptq", "int4"])
def test_calibrated_formats_refuse_mixture_of_experts_clearly(tiny, format_name):
    _, model_dir = tiny
    with pytest.raises(ValueError, match="calibrated quantisation .* not supported for mixture-of-experts.*int4-g128"):
        load_model(model_dir, format_name)


def test_dense_models_count_no_experts(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32)
                     ).save_pretrained(tmp_path)
    runner = _runner(load_model(tmp_path, "fp32"))
    runner.run_prefill([PrefillChunk([1, 2, 3], 0, [0])])
    assert runner.expert_load is None and runner.expert_load_counts() == []
