"""Task suites generated from templates, with every answer computed in code: several hundred items per suite,
so that a drop of a few points stands out of the noise (common/fidelity/stats.py gives the intervals).

Each suite is seeded (`random.Random(seed)`) and its file records GENERATOR_VERSION, the seed and the item count
in a first line; change a template and GENERATOR_VERSION goes up with it. Regenerate the committed files with

    .venv/bin/python -m common.fidelity.generated          # writes evals/generated/gen-*.jsonl

Prompts are short few-shot patterns (two or three examples, under about 60 tokens): every weight format runs
every item, on a CPU. The items are easy on purpose: the default model has 135M parameters, and a suite on which
fp32 scores near 0 or 100 % cannot show a drop.
"""

import datetime
import json
import operator
import random
import sys
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

from common.fidelity.suites import DEFAULT_SUITES_DIR, TaskItem

GENERATOR_VERSION = 1
GENERATED_DIR = DEFAULT_SUITES_DIR / "generated"
NUM_ITEMS = 360  # a multiple of every suite's number of kinds
SEED = 2024

# English -> French, Spanish, German: single common words with one usual translation each (no word whose
# translation hangs on the region or on usage, as car: coche / carro, or fish: pez / pescado).
WORDS = {
    "water": ("eau", "agua", "Wasser"), "dog": ("chien", "perro", "Hund"), "cat": ("chat", "gato", "Katze"),
    "house": ("maison", "casa", "Haus"), "book": ("livre", "libro", "Buch"), "sun": ("soleil", "sol", "Sonne"),
    "moon": ("lune", "luna", "Mond"), "star": ("étoile", "estrella", "Stern"), "bread": ("pain", "pan", "Brot"),
    "milk": ("lait", "leche", "Milch"), "cheese": ("fromage", "queso", "Käse"), "egg": ("œuf", "huevo", "Ei"),
    "apple": ("pomme", "manzana", "Apfel"), "wine": ("vin", "vino", "Wein"), "coffee": ("café", "café", "Kaffee"),
    "red": ("rouge", "rojo", "rot"), "green": ("vert", "verde", "grün"), "blue": ("bleu", "azul", "blau"),
    "black": ("noir", "negro", "schwarz"), "white": ("blanc", "blanco", "weiß"), "two": ("deux", "dos", "zwei"),
    "three": ("trois", "tres", "drei"), "four": ("quatre", "cuatro", "vier"), "five": ("cinq", "cinco", "fünf"),
    "six": ("six", "seis", "sechs"), "seven": ("sept", "siete", "sieben"), "ten": ("dix", "diez", "zehn"),
    "day": ("jour", "día", "Tag"), "night": ("nuit", "noche", "Nacht"), "summer": ("été", "verano", "Sommer"),
    "winter": ("hiver", "invierno", "Winter"), "school": ("école", "escuela", "Schule"),
    "friend": ("ami", "amigo", "Freund"), "mother": ("mère", "madre", "Mutter"), "father": ("père", "padre", "Vater"),
    "brother": ("frère", "hermano", "Bruder"), "sister": ("sœur", "hermana", "Schwester"),
    "hand": ("main", "mano", "Hand"), "head": ("tête", "cabeza", "Kopf"), "heart": ("cœur", "corazón", "Herz"),
    "sea": ("mer", "mar", "Meer"), "tree": ("arbre", "árbol", "Baum"), "flower": ("fleur", "flor", "Blume"),
    "horse": ("cheval", "caballo", "Pferd"), "king": ("roi", "rey", "König"), "city": ("ville", "ciudad", "Stadt"),
    "door": ("porte", "puerta", "Tür"), "window": ("fenêtre", "ventana", "Fenster"),
    "chair": ("chaise", "silla", "Stuhl"), "table": ("table", "mesa", "Tisch"), "yes": ("oui", "sí", "ja"),
}
LANGUAGES = ("French", "Spanish", "German")
WEEKDAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December")


NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
                "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen", "twenty")
PLAIN_WORDS = ("apple", "house", "river", "green", "table", "music", "happy", "water", "chair", "bread", "light",
               "stone", "paper", "horse", "cloud")

OPERATORS = {"+": operator.add, "-": operator.sub, "*": operator.mul}

Example = tuple[str, str]  # (query, answer): "3 + 4 =", "7"
Kind = Callable[[random.Random], TaskItem]


def _few_shot(rng: random.Random, make: Callable[[random.Random], Example], num_examples: int = 2,
              separator: str = " ", max_new_tokens: int = 6, **options) -> TaskItem:
    """num_examples solved examples, then the query: each "query<separator>answer" on its own line(s)."""
    query, answer = make(rng)
    examples: list[Example] = []
    while len(examples) < num_examples:
        example = make(rng)
        if example[0] != query and example not in examples:
            examples.append(example)
    prompt = "".join(f"{q}{separator}{a}\n" for q, a in examples) + query + separator.strip(" ")
    return TaskItem(prompt=prompt, answer=answer, max_new_tokens=max_new_tokens, **options)


def _pattern(make: Callable[[random.Random], Example], num_examples: int = 2, separator: str = " ",
             max_new_tokens: int = 6, **options) -> Kind:
    return lambda rng: _few_shot(rng, make, num_examples, separator, max_new_tokens, **options)


def _operation(symbol: str, low: int, high: int, small_high: int) -> Callable[[random.Random], Example]:
    """a <symbol> b with a in [low, high] and b in [1, small_high]."""
    def make(rng: random.Random) -> Example:
        a, b = rng.randint(low, high), rng.randint(1, small_high)
        return f"{a} {symbol} {b} =", str(OPERATORS[symbol](a, b))
    return make


def _conversion(unit: str, to_unit: str, factor: int, reverse: bool = False) -> Callable[[random.Random], Example]:
    def make(rng: random.Random) -> Example:
        n = rng.randint(1, 9)
        if reverse:
            return f"{n * factor} {to_unit} =", f"{n} {unit}"
        return f"{n} {unit} =", f"{n * factor} {to_unit}"
    return make


def _weekday_after(days: tuple[int, ...], phrase: str) -> Callable[[random.Random], Example]:
    """The weekday `n` days after a date's weekday, through datetime (2024-01-01 was a Monday)."""
    def make(rng: random.Random) -> Example:
        start = datetime.date(2024, 1, 1) + datetime.timedelta(days=rng.randrange(7))
        n = rng.choice(days)
        later = start + datetime.timedelta(days=n)
        query = phrase.format(day=WEEKDAYS[start.weekday()], n=n, days="day" if n == 1 else "days")
        return query, WEEKDAYS[later.weekday()]
    return make


def _random_date(rng: random.Random) -> datetime.date:
    """A day of 2023: the items name no year, so none may hang on a leap day."""
    return datetime.date(2023, 1, 1) + datetime.timedelta(days=rng.randrange(365))


def _month_day(date: datetime.date) -> str:
    return f"{MONTHS[date.month - 1]} {date.day}"


def _next_date(rng: random.Random) -> Example:
    date = _random_date(rng)
    return f"{_month_day(date)} + 1 day =", _month_day(date + datetime.timedelta(days=1))


def _days_between(rng: random.Random) -> Example:
    start = _random_date(rng)
    end = start + datetime.timedelta(days=rng.randint(1, 3))
    return f"Days from {_month_day(start)} to {_month_day(end)}:", str((end - start).days)


def _month_after(rng: random.Random) -> Example:
    month = rng.randrange(12)
    return f"The month after {MONTHS[month]} is", MONTHS[(month + 1) % 12]


# Python expressions of one kind each; the answer is what the REPL prints.
EXPRESSIONS: dict[str, Callable[[random.Random], str]] = {
    "upper": lambda rng: f"'{rng.choice(PLAIN_WORDS[:10])}'.upper()",
    "lower": lambda rng: f"'{rng.choice(PLAIN_WORDS[:10]).upper()}'.lower()",
    "str": lambda rng: f"str({rng.randint(10, 99)})",
    "max": lambda rng: f"max({rng.randint(1, 9)}, {rng.randint(1, 9)})",
    "index": lambda rng: f"[{rng.randint(1, 9)}, {rng.randint(1, 9)}, {rng.randint(1, 9)}][0]",
    "list": lambda rng: f"list('{rng.choice(('ab', 'xy', 'hi', 'ok', 'no'))}')",
    "compare": lambda rng: f"{rng.randint(1, 9)} > {rng.randint(1, 9)}",
    "len": lambda rng: f"len('{'abcdefg'[:rng.randint(1, 6)]}')",
}


def _expression(kind: str) -> Callable[[random.Random], Example]:
    def make(rng: random.Random) -> Example:
        expression = EXPRESSIONS[kind](rng)
        return f">>> {expression}", repr(eval(expression))
    return make


def _translation(to_english: bool) -> Kind:
    """A word from English into French, Spanish or German, or back; the examples share the item's language."""
    def kind(rng: random.Random) -> TaskItem:
        index = rng.randrange(len(LANGUAGES))
        language = LANGUAGES[index]

        def make(rng: random.Random) -> Example:
            english = rng.choice(sorted(WORDS))
            foreign = WORDS[english][index]
            if to_english:
                return f"{language}: {foreign}\nEnglish:", english
            return f"English: {english}\n{language}:", foreign
        return _few_shot(rng, make, ignore_case=True)
    return kind


def _capitals(rng: random.Random) -> Example:
    word = rng.choice(PLAIN_WORDS)
    return f"Write {word} in capital letters:", word.upper()


def _small_letters(rng: random.Random) -> Example:
    word = rng.choice(PLAIN_WORDS)
    return f"Write {word.upper()} in small letters:", word


def _digits(rng: random.Random) -> Example:
    n = rng.randrange(len(NUMBER_WORDS))
    return f"{NUMBER_WORDS[n]} in digits:", str(n)


def _say_chat(rng: random.Random) -> TaskItem:
    """A chat turn: the reply must begin with the word (any case)."""
    word = rng.choice(PLAIN_WORDS)
    return TaskItem(prompt=f"Say {word}.", answer=rf"^\W*{word}\b", chat=True, max_new_tokens=8, match="regex",
                    ignore_case=True)


def _digits_chat(rng: random.Random) -> TaskItem:
    """A chat turn: the reply must hold the number in digits."""
    n = rng.randint(1, 12)
    return TaskItem(prompt=f"What is {NUMBER_WORDS[n]} in digits?", answer=rf"\b{n}\b", chat=True, max_new_tokens=12,
                    match="regex")


# Each suite's items cycle through its kinds, so every kind holds the same share of the suite.
SUITES: dict[str, tuple[Kind, ...]] = {
    "gen-arithmetic": (_pattern(_operation("+", 1, 9, 9), 3), _pattern(_operation("+", 10, 40, 9), 3),
                       _pattern(_operation("-", 5, 15, 5), 3), _pattern(_operation("*", 2, 5, 5), 3)),
    "gen-units": (_pattern(_conversion("m", "cm", 100)), _pattern(_conversion("m", "cm", 100, reverse=True)),
                  _pattern(_conversion("kg", "g", 1000)), _pattern(_conversion("kg", "g", 1000, reverse=True)),
                  _pattern(_conversion("km", "m", 1000)), _pattern(_conversion("L", "mL", 1000))),
    "gen-dates": (_pattern(_weekday_after((1,), "Today is {day}. Tomorrow is"), 3),
                  _pattern(_weekday_after((1, 7), "{day} + {n} {days} ="), 3), _pattern(_month_after, 3),
                  _pattern(_next_date, 3), _pattern(_days_between, 3)),
    "gen-code": tuple(_pattern(_expression(kind), separator="\n", max_new_tokens=8) for kind in EXPRESSIONS),
    "gen-words": (_translation(to_english=False), _translation(to_english=True)),
    "gen-instructions": (_pattern(_capitals), _pattern(_small_letters), _pattern(_digits, 3), _say_chat,
                         _digits_chat),
}


def generate(name: str, num_items: int = NUM_ITEMS, seed: int = SEED) -> list[TaskItem]:
    rng = random.Random(seed)
    kinds = SUITES[name]
    return [kinds[i % len(kinds)](rng) for i in range(num_items)]


def suite_text(name: str, num_items: int = NUM_ITEMS, seed: int = SEED) -> str:
    """The suite file: a header line (generator version, seed, item count), then one item per line."""
    header = {"generator_version": GENERATOR_VERSION, "suite": name, "seed": seed, "num_items": num_items}
    lines = [json.dumps(header)] + [json.dumps(asdict(item), ensure_ascii=False) for item in generate(name, num_items, seed)]
    return "\n".join(lines) + "\n"


def write_all(directory: Path = GENERATED_DIR) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in SUITES:
        path = directory / f"{name}.jsonl"
        path.write_text(suite_text(name), encoding="utf-8")
        paths.append(path)
    return paths


if __name__ == "__main__":
    for written in write_all(Path(sys.argv[1]) if len(sys.argv) > 1 else GENERATED_DIR):
        print(written)
