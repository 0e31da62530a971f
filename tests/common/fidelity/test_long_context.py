"""Long-context fidelity on the default model: the chunked causal pass scores exactly the tokens it names,
with log-probabilities equal to transformers' on the same weights; needle prompts hold their number where
they say and fit their length; and (slow, 25 s) the fp32 model retrieves a needle at 2k tokens through the
chunked prefill and decode."""

import pytest
import torch

from common.fidelity import long_context
from common.fidelity.long_context import ANSWER_TOKENS, LongContext
from common.model.weights import load_model


def test_chunked_pass_scores_the_named_tokens_as_transformers_does(model_dir, monkeypatch):
    from transformers import LlamaForCausalLM

    monkeypatch.setattr(long_context, "CHUNK", 96)  # several chunks, one ending inside a scored range
    lc = LongContext(model_dir, marks=(160, 320), scored_tokens=64)
    ours = lc._mark_log_probs(load_model(model_dir, "fp32"), "float32")
    reference = LlamaForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        logits = reference(torch.tensor([lc.ids[:320]])).logits[0]
    expected = torch.log_softmax(logits.float(), dim=-1)
    for mark in (160, 320):
        # Row i predicts token mark - 64 + i, from position mark - 65 + i.
        torch.testing.assert_close(ours[mark], expected[mark - 65:mark - 1], atol=2e-3, rtol=0)
    result = lc.evaluate(load_model(model_dir, "fp32"))
    assert result.marks[320]["ppl_increase"] == 0.0 and result.marks[320]["top1_agreement"] == 1.0


def test_needle_prompts_hold_their_number_at_their_depth_and_fit_their_length(model_dir):
    lc = LongContext(model_dir)
    assert [(n.length, n.depth) for n in lc.needles] == [(m, d) for m in (2048, 4096, 8192) for d in (0.25, 0.75)]
    for needle in lc.needles:
        text = lc.tokenizer.decode(needle.prompt)
        assert len(needle.prompt) + ANSWER_TOKENS <= needle.length
        assert len(needle.prompt) > needle.length - 300  # filled with text, not short
        at = text.index(f"secret number of the archive is {needle.number}.") / len(text)
        assert abs(at - needle.depth) < 0.1, (needle.depth, at)
    assert len({n.number for n in lc.needles}) == len(lc.needles)


@pytest.mark.slow
def test_fp32_retrieves_a_needle_from_two_thousand_tokens(model_dir):
    lc = LongContext(model_dir)
    model = load_model(model_dir, "fp32")
    needle = lc.needles[0]
    answer = lc.tokenizer.decode(long_context._greedy(model, needle.prompt, "float32"))
    assert needle.number in answer, answer
