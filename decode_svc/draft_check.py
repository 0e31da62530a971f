"""Whether a draft model can propose for a target: its token ids must mean the same text, so the two
checkpoints must share the tokenizer (vocabulary, merges, added tokens), the special tokens, and the
vocabulary size of the embedding and LM head. Checked once at start-up; a mismatch stops the decode tier
with a message naming what differs. No torch here."""

import json
from pathlib import Path
from typing import Any

from common.basics.model_config import ModelConfig

_SPECIAL_TOKENS = ("bos_token", "eos_token", "pad_token", "unk_token")


class DraftMismatch(ValueError):
    """The draft model does not share the target's tokenizer; the message says what differs."""


def check_draft_matches(target_dir: Path, draft_dir: Path) -> None:
    """Raises DraftMismatch naming every difference between the two checkpoints' tokenizers."""
    problems = _config_differences(ModelConfig.from_dir(target_dir), ModelConfig.from_dir(draft_dir),
                                   _json(target_dir / "config.json"), _json(draft_dir / "config.json"))
    if not (draft_dir / "tokenizer.json").exists():
        problems.append("the draft has no tokenizer.json to compare")
    else:
        problems += tokenizer_differences(_json(target_dir / "tokenizer.json"), _json(draft_dir / "tokenizer.json"))
    problems += _special_differences(_json(target_dir / "tokenizer_config.json", {}),
                                     _json(draft_dir / "tokenizer_config.json", {}))
    if problems:
        raise DraftMismatch(f"draft model {draft_dir} does not share the tokenizer of {target_dir.name}: "
                            + "; ".join(problems))


def tokenizer_differences(target: dict, draft: dict) -> list[str]:
    """What differs between two tokenizer.json documents: the token -> id map, the merges, added tokens."""
    problems = []
    vocab_t, vocab_d = target.get("model", {}).get("vocab", {}), draft.get("model", {}).get("vocab", {})
    differing = sorted(t for t in vocab_t.keys() | vocab_d.keys() if vocab_t.get(t) != vocab_d.get(t))
    if differing:
        token = differing[0]
        problems.append(f"vocabulary: {len(differing)} tokens differ (e.g. {token!r} is id {vocab_t.get(token)} "
                        f"in the target, {vocab_d.get(token)} in the draft)")
    merges_t, merges_d = _merges(target), _merges(draft)
    if merges_t != merges_d:
        first = next((i for i, (a, b) in enumerate(zip(merges_t, merges_d)) if a != b),
                     min(len(merges_t), len(merges_d)))
        problems.append(f"merges: {len(merges_t)} in the target, {len(merges_d)} in the draft, "
                        f"first difference at {first}")
    added_t, added_d = _added(target), _added(draft)
    if added_t != added_d:
        token = sorted(t for t in added_t.keys() | added_d.keys() if added_t.get(t) != added_d.get(t))[0]
        problems.append(f"added tokens: {token!r} is id {added_t.get(token)} in the target, {added_d.get(token)} "
                        "in the draft")
    return problems


def _config_differences(target: ModelConfig, draft: ModelConfig, raw_t: dict, raw_d: dict) -> list[str]:
    problems = []
    if target.vocab_size != draft.vocab_size:
        problems.append(f"vocab_size: {target.vocab_size} in the target, {draft.vocab_size} in the draft")
    if set(target.eos_token_ids) != set(draft.eos_token_ids):
        problems.append(f"EOS token ids: {sorted(target.eos_token_ids)} in the target, "
                        f"{sorted(draft.eos_token_ids)} in the draft")
    if raw_t.get("bos_token_id") != raw_d.get("bos_token_id"):
        problems.append(f"BOS token id: {raw_t.get('bos_token_id')} in the target, {raw_d.get('bos_token_id')} "
                        "in the draft")
    return problems


def _special_differences(target: dict, draft: dict) -> list[str]:
    return [f"{name}: {_content(target.get(name))!r} in the target, {_content(draft.get(name))!r} in the draft"
            for name in _SPECIAL_TOKENS if _content(target.get(name)) != _content(draft.get(name))]


def _merges(tokenizer: dict) -> list[str]:
    """Merges as "a b" strings (tokenizer.json writes them as strings or as pairs, by version)."""
    return [m if isinstance(m, str) else " ".join(m) for m in tokenizer.get("model", {}).get("merges", [])]


def _added(tokenizer: dict) -> dict[str, int]:
    return {t["content"]: t["id"] for t in tokenizer.get("added_tokens", [])}


def _content(token: Any) -> Any:
    return token.get("content") if isinstance(token, dict) else token


def _json(path: Path, default: dict | None = None) -> dict:
    if default is not None and not path.exists():
        return default
    return json.loads(path.read_text())
