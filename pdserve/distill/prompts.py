"""Prompts the target answers to make the draft's training text: open chat requests built from task
templates and topics, and extractive requests (repeat, quote, rewrite, fix typos, answer from) over text
the target itself wrote earlier in the run, so the draft also learns the copying that serving sees.

None of the bench's passages or questions (pdserve/bench/texts.py) are used: the bench measures the draft
on text it was not trained on. No torch here.
"""

import random
from collections import deque

TASKS = (
    "Explain {topic} to a curious teenager.",
    "Write a short paragraph about {topic}.",
    "What are three interesting facts about {topic}?",
    "Give me a step-by-step guide related to {topic}.",
    "Write a short story that involves {topic}.",
    "What are the pros and cons of {topic}?",
    "Summarize the history of {topic} in a few sentences.",
    "Write a haiku about {topic}.",
    "How would you teach a beginner about {topic}?",
    "Write an email to a friend recommending {topic}.",
    "What are common misconceptions about {topic}?",
    "Describe {topic} in simple words.",
    "Write a list of tips about {topic}.",
    "Compare {topic} with something similar and explain the differences.",
    "Why does {topic} matter today?",
    "Write a short dialogue between two people discussing {topic}.",
    "Answer briefly: what is the most important thing to know about {topic}?",
    "Write a product review related to {topic}.",
)

TOPICS = (
    "volcanoes", "the water cycle", "honeybees", "learning a new language", "the moon landing", "bread baking",
    "electric cars", "chess openings", "the human heart", "saving money", "rainforests", "the printing press",
    "solar panels", "jazz music", "sleep and memory", "black holes", "gardening in small spaces", "the Roman Empire",
    "machine learning", "recycling plastic", "marathon training", "photosynthesis", "coffee", "earthquakes",
    "public libraries", "writing a resume", "the immune system", "video games", "climate change", "origami",
    "the stock market", "Python programming", "sorting algorithms", "the Great Wall of China", "meditation",
    "octopuses", "bicycles", "the Internet", "vaccines", "Mount Everest", "time management", "cheese making",
    "the solar system", "ancient Egypt", "friendship", "public speaking", "tea ceremonies", "wind turbines",
    "dinosaurs", "the French Revolution", "healthy breakfasts", "cloud computing", "penguins", "smartphones",
    "museums", "the ocean floor", "first aid", "hiking safety", "databases", "poetry", "renewable energy",
    "birds migrating", "cooking pasta", "the Olympic Games", "glaciers", "minimalism", "3D printing",
    "the periodic table", "job interviews", "electricity", "pizza", "rivers", "mathematics", "recycling",
)

EXTRACTIVE = (
    "Repeat the following text exactly:\n\n{text}",
    "Quote the first sentence of this text:\n\n{text}",
    "Rewrite the following text, replacing every \"{word}\" with \"{other}\":\n\n{text}",
    "Fix the typos in this text and return the corrected text:\n\n{typos}",
    "Here is a text:\n\n{text}\n\nWhat is it about? Answer using words from the text.",
    "Copy the last sentence of this text:\n\n{text}",
    "Summarize this text in two sentences:\n\n{text}",
)
_OTHER_WORDS = ("thing", "idea", "system", "place", "person", "story", "item", "example")


def with_typos(text: str, rng: random.Random, count: int) -> str:
    """Swaps two adjacent letters in `count` random words."""
    words = text.split(" ")
    for index in rng.sample(range(len(words)), min(count, len(words))):
        w = words[index]
        if len(w) > 3 and w.isalpha():
            i = rng.randrange(len(w) - 1)
            words[index] = w[:i] + w[i + 1] + w[i] + w[i + 2:]
    return " ".join(words)


class PromptSource:
    """Endless user turns: open requests, and extractive ones over answers fed back with `add_text`."""

    def __init__(self, seed: int, extractive_share: float = 0.35) -> None:
        self.rng = random.Random(seed)
        self.extractive_share = extractive_share
        self.texts: deque[str] = deque(maxlen=64)  # recent answers to quote from

    def add_text(self, text: str) -> None:
        if 150 <= len(text) <= 1500:
            self.texts.append(text.strip())

    def next(self) -> str:
        if self.texts and self.rng.random() < self.extractive_share:
            return self._extractive(self.texts.popleft())
        return self.rng.choice(TASKS).format(topic=self.rng.choice(TOPICS))

    def _extractive(self, text: str) -> str:
        words = [w for w in text.split() if w.isalpha() and len(w) > 4]
        word = self.rng.choice(words) if words else "the"
        return self.rng.choice(EXTRACTIVE).format(text=text, word=word, other=self.rng.choice(_OTHER_WORDS),
                                                  typos=with_typos(text, self.rng, 4))
