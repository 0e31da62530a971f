"""The Mixtral-style MoE MLP against Hugging Face's MixtralSparseMoeBlock on a small random configuration with
the same weights: same outputs, same routing (expert load), and per-expert quantisation."""

import pytest
import torch

from common.model.moe import MoeMlp
from common.model.quant_int8 import Int8Weight


@pytest.fixture(scope="module")
def hf_block():
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    torch.manual_seed(0)
    config = MixtralConfig(hidden_size=64, intermediate_size=96, num_local_experts=6, num_experts_per_tok=2)
    block = MixtralSparseMoeBlock(config).eval()
    for param in block.parameters():
        param.data.normal_(0, 0.1)
    return block


def _ours(block, weight_format="fp32") -> MoeMlp:
    return MoeMlp.from_weights(block.gate.weight.detach(), block.experts.gate_up_proj.detach(),
                               block.experts.down_proj.detach(), block.top_k, weight_format)


def test_moe_output_and_expert_load_equal_transformers(hf_block):
    hidden = torch.randn(3, 11, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf_block(hidden)
        _, _, hf_chosen = hf_block.gate(hidden.view(-1, 64))
    moe = _ours(hf_block)
    expert_load = torch.zeros(6, dtype=torch.long)
    out = moe(hidden.view(-1, 64), expert_load).view(3, 11, 64)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    assert expert_load.tolist() == torch.bincount(hf_chosen.flatten(), minlength=6).tolist()
    assert expert_load.sum() == 33 * 2
    torch.testing.assert_close(moe(hidden.view(-1, 64)).view(3, 11, 64), out)  # counting is optional


def test_moe_quantises_each_expert(hf_block):
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    dequantised = MixtralSparseMoeBlock(_config(hf_block)).eval()
    dequantised.load_state_dict(hf_block.state_dict())
    with torch.no_grad():
        for e in range(6):
            dequantised.experts.gate_up_proj[e] = Int8Weight.pack(hf_block.experts.gate_up_proj[e]).dequantize_rows()
            dequantised.experts.down_proj[e] = Int8Weight.pack(hf_block.experts.down_proj[e]).dequantize_rows()
    hidden = torch.randn(20, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = dequantised(hidden[None])[0]
    moe = _ours(hf_block, "int8")
    assert all(type(e.gate_up.weight) is Int8Weight for e in moe.experts)
    torch.testing.assert_close(moe(hidden), expected, atol=1e-5, rtol=1e-5)


def _config(block):
    from transformers import MixtralConfig

    return MixtralConfig(hidden_size=64, intermediate_size=96, num_local_experts=6, num_experts_per_tok=block.top_k)
