"""A draft model must share the target's tokenizer; a mismatch is a start-up error that names what differs.
Small synthetic checkpoints (config and tokenizer files only, no weights)."""

import json
from pathlib import Path

import pytest

from common.basics.config import DecodeConfig
from decode_svc.draft_check import DraftMismatch, check_draft_matches

_CONFIG = {"model_type": "llama", "hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 2,
           "num_attention_heads": 2, "num_key_value_heads": 1, "rms_norm_eps": 1e-5, "max_position_embeddings": 64,
           "vocab_size": 6, "bos_token_id": 1, "eos_token_id": 2, "tie_word_embeddings": True}
_TOKENIZER = {"added_tokens": [{"id": 1, "content": "<s>"}, {"id": 2, "content": "</s>"}],
              "model": {"type": "BPE", "vocab": {"<unk>": 0, "<s>": 1, "</s>": 2, "a": 3, "b": 4, "ab": 5},
                        "merges": ["a b"]}}
_TOKENIZER_CONFIG = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}


def _checkpoint(path: Path, config=None, tokenizer=None, tokenizer_config=None) -> Path:
    path.mkdir()
    (path / "config.json").write_text(json.dumps({**_CONFIG, **(config or {})}))
    if tokenizer is not False:
        (path / "tokenizer.json").write_text(json.dumps(tokenizer or _TOKENIZER))
    (path / "tokenizer_config.json").write_text(json.dumps({**_TOKENIZER_CONFIG, **(tokenizer_config or {})}))
    return path


def test_the_same_tokenizer_passes(tmp_path):
    check_draft_matches(_checkpoint(tmp_path / "target"), _checkpoint(tmp_path / "draft", {"num_hidden_layers": 1}))


@pytest.mark.parametrize("draft, message", [
    (dict(tokenizer={**_TOKENIZER, "model": {**_TOKENIZER["model"],
                                             "vocab": {"<unk>": 0, "<s>": 1, "</s>": 2, "a": 4, "b": 3, "ab": 5}}}),
     "vocabulary: 2 tokens differ (e.g. 'a' is id 3 in the target, 4 in the draft)"),
    (dict(tokenizer={**_TOKENIZER, "model": {**_TOKENIZER["model"], "merges": [["b", "a"]]}}),
     "merges: 1 in the target, 1 in the draft, first difference at 0"),
    (dict(tokenizer={**_TOKENIZER, "added_tokens": [{"id": 1, "content": "<s>"}, {"id": 2, "content": "<eos>"}]}),
     "added tokens: '</s>' is id 2 in the target, None in the draft"),
    (dict(config={"eos_token_id": 1}), "EOS token ids: [2] in the target, [1] in the draft"),
    (dict(config={"bos_token_id": 0}), "BOS token id: 1 in the target, 0 in the draft"),
    (dict(config={"vocab_size": 8}), "vocab_size: 6 in the target, 8 in the draft"),
    (dict(tokenizer_config={"eos_token": "<unk>"}), "eos_token: '</s>' in the target, '<unk>' in the draft"),
    (dict(tokenizer=False), "the draft has no tokenizer.json to compare"),
])
def test_a_different_tokenizer_is_refused_naming_the_difference(tmp_path, draft, message):
    target = _checkpoint(tmp_path / "target")
    with pytest.raises(DraftMismatch, match="does not share the tokenizer of target") as raised:
        check_draft_matches(target, _checkpoint(tmp_path / "draft", **draft))
    assert message in str(raised.value)


def test_merges_written_as_pairs_equal_merges_written_as_strings(tmp_path):
    pairs = {**_TOKENIZER, "model": {**_TOKENIZER["model"], "merges": [["a", "b"]]}}
    check_draft_matches(_checkpoint(tmp_path / "target"), _checkpoint(tmp_path / "draft", tokenizer=pairs))


def test_draft_speculation_needs_a_draft_model(tmp_path):
    with pytest.raises(ValueError, match="--speculative draft and --draft-model PATH go together"):
        DecodeConfig(model_dir=tmp_path, speculative="draft")
    with pytest.raises(ValueError, match="go together"):
        DecodeConfig(model_dir=tmp_path, speculative="prompt-lookup", draft_model=tmp_path)
    assert DecodeConfig(model_dir=tmp_path, speculative="draft", draft_model=tmp_path).draft_model == tmp_path
