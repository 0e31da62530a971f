"""Generated task suites (common/fidelity/generated.py): the committed files are exactly what the generator
writes, every answer is right, and every prompt is short."""

import datetime
import json
import re

from common.fidelity import generated
from common.fidelity.suites import DEFAULT_SUITES_DIR, load_suites


def test_regenerating_reproduces_the_committed_files_byte_for_byte(tmp_path):
    written = generated.write_all(tmp_path)
    assert [p.name for p in written] == [f"{name}.jsonl" for name in generated.SUITES]
    for path in written:
        committed = generated.GENERATED_DIR / path.name
        assert committed.read_bytes() == path.read_bytes(), (
            f"{committed} is stale: run .venv/bin/python -m common.fidelity.generated")
    assert sorted(p.name for p in generated.GENERATED_DIR.glob("*.jsonl")) == sorted(p.name for p in written)


def test_the_default_directory_loads_generated_and_hand_written_suites_and_only_selects_them():
    suites = {s.name: s for s in load_suites(DEFAULT_SUITES_DIR)}
    assert {"perplexity", "arithmetic", "code"} <= suites.keys() and set(generated.SUITES) <= suites.keys()
    for name in generated.SUITES:
        assert len(suites[name].tasks) == generated.NUM_ITEMS
        assert suites[name].generator_version == generated.GENERATOR_VERSION
    assert suites["arithmetic"].generator_version is None
    only = load_suites(DEFAULT_SUITES_DIR, ["gen-dates", "arithmetic"])
    assert [s.name for s in only] == ["arithmetic", "gen-dates"]


def test_a_file_records_its_generator_version_and_seed():
    header = json.loads(generated.suite_text("gen-units", num_items=3, seed=7).splitlines()[0])
    assert header == {"generator_version": generated.GENERATOR_VERSION, "suite": "gen-units", "seed": 7,
                      "num_items": 3}
    assert generated.suite_text("gen-units", 3, 7) != generated.suite_text("gen-units", 3, 8)


def _query(prompt: str) -> str:
    return prompt.splitlines()[-1]


def test_every_answer_is_computed_right():
    """Recomputed here from each item's query line, independently of the templates."""
    for item in generated.generate("gen-arithmetic"):
        assert str(eval(_query(item.prompt).rstrip("= "))) == item.answer
    for item in generated.generate("gen-code"):
        assert repr(eval(item.prompt.splitlines()[-1].removeprefix(">>> "))) == item.answer
    months = {m: i + 1 for i, m in enumerate(generated.MONTHS)}
    for item in generated.generate("gen-dates"):
        query = _query(item.prompt)
        if found := re.fullmatch(r"Days from (\w+) (\d+) to (\w+) (\d+):", query):
            start, end = (datetime.date(2023, months[found[i]], int(found[i + 1])) for i in (1, 3))
            assert str((end - start).days % 365) == item.answer  # 2023 is no leap year
        elif found := re.fullmatch(r"(\w+) (\d+) \+ 1 day =", query):
            day = datetime.date(2023, months[found[1]], int(found[2])) + datetime.timedelta(days=1)
            assert f"{generated.MONTHS[day.month - 1]} {day.day}" == item.answer
        elif found := re.fullmatch(r"(\w+) \+ (\d+) days? =", query):
            if found[1] in generated.WEEKDAYS:
                index = generated.WEEKDAYS.index(found[1]) + int(found[2])
                assert generated.WEEKDAYS[index % 7] == item.answer
    for item in generated.generate("gen-words"):
        lines = item.prompt.splitlines()
        word, language = lines[-2].split(": ")[1], lines[-1].rstrip(":")
        if language == "English":
            assert item.answer in generated.WORDS
        else:
            assert generated.WORDS[word][generated.LANGUAGES.index(language)] == item.answer


def test_translations_are_single_words_and_unambiguous_back_into_english():
    for language_index in range(len(generated.LANGUAGES)):
        translations = [words[language_index] for words in generated.WORDS.values()]
        assert all(" " not in w for w in translations)
        assert len(set(t.lower() for t in translations)) == len(translations)


def test_prompts_are_short(tokenizer):
    for name in generated.SUITES:
        for item in generated.generate(name, num_items=60):
            ids = (tokenizer.apply_chat_template([{"role": "user", "content": item.prompt}]) if item.chat
                   else tokenizer.encode(item.prompt))
            assert len(ids) < 64, (name, item.prompt)


def test_suites_mix_their_kinds_evenly_and_answers_vary():
    for name, kinds in generated.SUITES.items():
        items = generated.generate(name)
        assert len(items) == generated.NUM_ITEMS and len(items) % len(kinds) == 0
        assert len({item.answer for item in items}) >= 10, name
