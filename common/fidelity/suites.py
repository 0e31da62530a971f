"""Evaluation suites: JSON-lines files in evals/, one item per line.

A perplexity suite holds {"text": ...} items. A task suite holds exact-answer items:
    {"prompt": ..., "answer": ..., "chat": false, "max_new_tokens": 8, "match": "first_line", "ignore_case": false}
"chat" renders the prompt as one user turn with the model's chat template; "match" is "first_line" (the
first non-empty line of the completion, stripped, equals the answer), "contains" (the answer appears in it) or
"regex" (the answer is a Python regular expression found in the stripped completion: `^\\W*paris\\b`).
"ignore_case" applies to all three.

A generated suite (common/fidelity/generated.py, in evals/generated/) opens with a header line
{"generator_version": ..., "suite": ..., "seed": ..., "num_items": ...}. Suites are found in the directory and
its subdirectories and named by file stem, so `--only gen-arithmetic` selects evals/generated/gen-arithmetic.jsonl.
"""

import json
import re
from dataclasses import dataclass, replace
from pathlib import Path

DEFAULT_SUITES_DIR = Path(__file__).resolve().parents[2] / "evals"  # the repository's evals/

MATCHES = ("first_line", "contains", "regex")


@dataclass(frozen=True)
class TaskItem:
    prompt: str
    answer: str
    chat: bool = False
    max_new_tokens: int = 8
    match: str = "first_line"
    ignore_case: bool = False

    def __post_init__(self) -> None:
        if self.match not in MATCHES:
            raise ValueError(f"match must be one of {MATCHES}, got {self.match!r}")
        if self.match == "regex":
            try:
                re.compile(self.answer)
            except re.error as error:
                raise ValueError(f"answer {self.answer!r} is not a regular expression: {error}") from None

    def is_correct(self, completion: str) -> bool:
        if self.match == "regex":
            return re.search(self.answer, completion.strip(), re.IGNORECASE if self.ignore_case else 0) is not None
        answer, text = (self.answer.lower(), completion.lower()) if self.ignore_case else (self.answer, completion)
        if self.match == "contains":
            return answer in text
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        return bool(lines) and lines[0] == answer.strip()


@dataclass(frozen=True)
class Suite:
    name: str
    texts: tuple[str, ...] = ()  # perplexity suite
    tasks: tuple[TaskItem, ...] = ()  # task suite
    generator_version: int | None = None  # generated suites only

    @property
    def is_perplexity(self) -> bool:
        return bool(self.texts)

    def head(self, num_items: int | None) -> "Suite":
        """The first num_items task items (all of them for None; perplexity texts are kept whole)."""
        if num_items is None or self.is_perplexity:
            return self
        return replace(self, tasks=self.tasks[:num_items])


def load_suite(path: Path) -> Suite:
    texts, tasks, generator_version = [], [], None
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
            if "generator_version" in item:
                generator_version = item["generator_version"]
            elif "text" in item:
                texts.append(item["text"])
            else:
                tasks.append(TaskItem(**item))
        except (json.JSONDecodeError, TypeError, ValueError) as error:
            raise ValueError(f"{path}:{number}: {error}") from None
    if bool(texts) == bool(tasks):
        raise ValueError(f"{path}: a suite holds either text items (perplexity) or task items, not {'both' if texts else 'neither'}")
    return Suite(path.stem, tuple(texts), tuple(tasks), generator_version)


def load_suites(directory: Path, only: list[str] | None = None) -> list[Suite]:
    paths = sorted(directory.rglob("*.jsonl"))
    if not paths:
        raise FileNotFoundError(f"no *.jsonl suites in {directory}")
    stems = [p.stem for p in paths]
    if len(set(stems)) < len(stems):
        raise ValueError(f"two suites share a name in {directory}: {sorted({s for s in stems if stems.count(s) > 1})}")
    suites = [load_suite(p) for p in paths if not only or p.stem in only]
    missing = set(only or ()) - {s.name for s in suites}
    if missing:
        raise ValueError(f"no suite named {', '.join(sorted(missing))} in {directory}")
    return suites
