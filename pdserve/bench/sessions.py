"""Workloads whose requests share prompt prefixes, the case prefix caching is for: sessions of token ids in
the model's ChatML chat template. Every prompt is built piece by piece (ChatMl), so that a later request
starts with an earlier one's ids exactly; the pieces equal the template rendered whole (a unit test checks
it). A session's requests are sent in order, each once the one before it has ended (pdserve/bench/loadgen.py).

- `multi-turn-chat`: conversations of 4-8 turns, all opening with the same ~500-token system prompt
  (texts.SYSTEM_PROMPT); the first user turn is an open-chat question, the next ones follow-ups (texts.py).
  Turn k+1 resends the whole history: turn k's prompt, the reply turn k really got (the token ids the server
  streamed, closed by `<|im_end|>` and a newline), then the new user turn and the assistant header. Real
  replies rather than canned ones, so the history is what a chat client sends, and a tier that keeps the KV
  of generated tokens can find it again. The price: turns after the first depend on each peer's own replies
  (greedy decoding: the same wherever the numerics are the same; each run reports the prompt tokens it sent).
- `document-qa`: documents of ~1,500 tokens (the passages of texts.py in a seeded order, the last one cut to
  fit, under a title of their own, so two documents share no KV block past the chat template's opening; the
  questions come from the whole passages) with 4-6 questions each, one request per question: the document,
  then the question, with no earlier answers. The questions on one document are a session (one reader asking
  one after another), so the first leaves the document's KV cached.
Each request asks for 32-64 new tokens. The last session may be cut short so that a run holds exactly
num_requests requests.
"""

import random
import re

from common.basics.tokenizer import TextTokenizer
from pdserve.bench.request import BenchRequest
from pdserve.bench.texts import FOLLOW_UPS, OPEN_CHAT_PROMPTS, PASSAGES, SYSTEM_PROMPT


class ChatMl:
    """The pieces of a ChatML conversation (the default model's chat template) as token ids."""

    def __init__(self, tokenizer: TextTokenizer) -> None:
        if tokenizer.encode(""):
            raise ValueError("the tokenizer adds special tokens to every text; ChatML pieces would repeat them")
        if len(tokenizer.encode("<|im_start|>")) != 1 or len(tokenizer.encode("<|im_end|>")) != 1:
            raise ValueError("the session workloads need a ChatML model (<|im_start|> and <|im_end|> tokens)")
        self._tokenizer = tokenizer
        self.generation_prompt = tuple(tokenizer.encode("<|im_start|>assistant\n"))
        # What closes an assistant reply in the history: the end-of-turn token (the model's EOS), a newline.
        self.reply_close = tuple(tokenizer.encode("<|im_end|>\n"))

    def message(self, role: str, content: str) -> tuple[int, ...]:
        return tuple(self._tokenizer.encode(f"<|im_start|>{role}\n{content}<|im_end|>\n"))


_TURNS_PER_CHAT = (4, 8)
_QUESTIONS_PER_DOCUMENT = (4, 6)
_SESSION_OUTPUT = (32, 64)
_DOCUMENT_TOKENS = 1_500
_DOCUMENT_INSTRUCTION = "Read the briefing pack below, then answer the question after it in one or two sentences."


def multi_turn_chat(num_requests: int, rng: random.Random, tokenizer: TextTokenizer) -> list[BenchRequest]:
    chat = ChatMl(tokenizer)
    system = chat.message("system", SYSTEM_PROMPT)
    requests: list[BenchRequest] = []
    while len(requests) < num_requests:
        session = requests[-1].session + 1 if requests else 0
        num_turns = min(rng.randint(*_TURNS_PER_CHAT), num_requests - len(requests))
        questions = [rng.choice(OPEN_CHAT_PROMPTS), *rng.sample(FOLLOW_UPS, num_turns - 1)]
        for turn, question in enumerate(questions):
            added = chat.message("user", question) + chat.generation_prompt
            requests.append(BenchRequest(len(requests), "later-turn" if turn else "first-turn",
                                         added if turn else system + added, rng.randint(*_SESSION_OUTPUT),
                                         session=session, reply_close_ids=chat.reply_close if turn else None))
    return requests


def document(number: int, rng: random.Random, tokenizer: TextTokenizer) -> tuple[str, list[str]]:
    """A briefing pack of at most _DOCUMENT_TOKENS tokens (a title of its own, then every passage in a seeded
    order, the last one cut after a sentence or a line to fit) and the questions its whole passages answer."""
    passages = rng.sample(PASSAGES, len(PASSAGES))
    title = f"Briefing pack {number} (reference {rng.randrange(10_000, 100_000)})"
    sections = [f"Section {i}: the {p.title}.\n{p.text}" for i, p in enumerate(passages, start=1)]
    pieces = re.split(r"(?<=\. )|(?<=\n)", sections[-1])  # sentences and lines, each with its separator
    text = "\n\n".join([title, *sections])
    while len(tokenizer.encode(text)) > _DOCUMENT_TOKENS and len(pieces) > 1:
        pieces.pop()
        text = "\n\n".join([title, *sections[:-1], "".join(pieces).rstrip()])
    return text, [q for p in passages[:-1] for q in p.questions]


def document_qa(num_requests: int, rng: random.Random, tokenizer: TextTokenizer) -> list[BenchRequest]:
    requests: list[BenchRequest] = []
    while len(requests) < num_requests:
        session = requests[-1].session + 1 if requests else 0
        text, questions = document(session + 1, rng, tokenizer)
        num_questions = min(rng.randint(*_QUESTIONS_PER_DOCUMENT), num_requests - len(requests))
        for i, question in enumerate(rng.sample(questions, num_questions)):
            content = f"{_DOCUMENT_INSTRUCTION}\n\n{text}\n\nQuestion: {question}"
            prompt = tuple(tokenizer.apply_chat_template([{"role": "user", "content": content}]))
            requests.append(BenchRequest(len(requests), "later-question" if i else "first-question", prompt,
                                         rng.randint(*_SESSION_OUTPUT), session=session))
    return requests
