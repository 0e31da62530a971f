"""Prompts where prompt lookup finds what to propose (and some where it does not), shared by the speculation tests."""

_ARTICLE = (
    "The Rhine rises in the Swiss Alps, flows through Lake Constance, forms part of the border between "
    "Germany and France, and reaches the North Sea in the Netherlands. Its valley has been a trade route "
    "since Roman times, and castles line the gorge between Bingen and Koblenz."
)
PROMPTS = [
    f"{_ARTICLE}\n\nRepeat the first sentence of the text above exactly:\n",
    f"{_ARTICLE}\n\nQuote the part about castles:\n",
    "def add(a, b):\n    return a + b\n\ndef sub(a, b):\n    return a - b\n\ndef mul(a, b):\n",
    "one two three four one two three four one two three",
    "The capital of France is",
    "Write a short poem about the sea.",
    "List the days of the week: Monday, Tuesday,",
    "Copy this sentence: The quick brown fox jumps over the lazy dog. Copy: The quick",
]
MAX_NEW_TOKENS = 24
