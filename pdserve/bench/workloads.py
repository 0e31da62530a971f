"""Named workloads, drawn with a fixed seed.

Most are prompt/output length distributions whose prompts are token ids drawn uniformly from ordinary
vocabulary ids (as vLLM's "random" dataset does): every peer gets the very same ids, with no tokenizer in
between, and greedy decoding of such prompts rarely meets end-of-sequence early, so output lengths follow
the distribution. Each request belongs to a class (`kind`), and the mixed workload interleaves long prompts
among short chat turns in a seeded random order.

Random ids never repeat, so a proposer that looks the next tokens up in the prompt (speculative decoding by
prompt lookup) finds nothing in them. The text workloads send real English instead, as one user chat turn
(the model's chat template applied by the gateway; an instruct model given raw text often ends at once):
`extractive` asks to repeat, quote, edit, correct or answer from a passage given in the prompt, and
`open-chat` asks open questions whose answers are not in the prompt. `long-budget` asks open questions for a
short answer with max_new_tokens 512: the model ends most answers by end-of-sequence long before the budget,
the case where a decode tier that reserves KV for the whole budget up front admits fewer sequences.

`multi-turn-chat` and `document-qa` share prompt prefixes, for prefix caching: sessions of token ids built
with the model's chat template (pdserve/bench/sessions.py tells how).
"""

import random
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from common.basics.tokenizer import TextTokenizer
from pdserve.bench.request import BenchRequest
from pdserve.bench.sessions import document_qa, multi_turn_chat
from pdserve.bench.texts import OPEN_CHAT_PROMPTS, PASSAGES, Passage

# Ordinary BPE tokens of the default model's vocabulary (ids below ~20 are ChatML and other control tokens).
_FIRST_ORDINARY_ID = 1_000
_LAST_ORDINARY_ID = 40_000


@dataclass(frozen=True)
class RequestClass:
    kind: str
    weight: float
    prompt_tokens: tuple[int, int] | None  # inclusive range, drawn uniformly; None for a text class
    output_tokens: tuple[int, int]  # inclusive range, drawn uniformly
    text: Callable[[random.Random], str] | None = None  # builds a text prompt (one user chat turn)


# Builds a workload's requests itself: (num_requests, seeded rng, the model's tokenizer) -> requests.
Builder = Callable[[int, random.Random, TextTokenizer], list[BenchRequest]]


@dataclass(frozen=True)
class Workload:
    name: str
    description: str
    classes: tuple[RequestClass, ...] = ()
    build: Builder | None = None  # instead of classes: sessions of token ids from the chat template

    @property
    def needs_tokenizer(self) -> bool:
        return self.build is not None


# -- Text workloads: prompts built from the passages and questions of pdserve/bench/texts.py.


def with_typos(text: str, rng: random.Random, count: int) -> str:
    """text with `count` of its longer words misspelt, each by swapping two adjacent inner letters that differ."""
    words = text.split(" ")
    candidates = [i for i, w in enumerate(words)
                  if len(w) >= 6 and w.isalpha() and any(a != b for a, b in zip(w[1:-2], w[2:-1]))]
    for i in rng.sample(candidates, min(count, len(candidates))):
        word = words[i]
        swaps = [j for j in range(1, len(word) - 2) if word[j] != word[j + 1]]
        j = rng.choice(swaps)
        words[i] = word[:j] + word[j + 1] + word[j] + word[j + 2:]
    return " ".join(words)


def _repeat(rng: random.Random, p: Passage) -> str:
    return f"Repeat the following {p.title} exactly, word for word.\n\n{p.text}"


def _quote(rng: random.Random, p: Passage) -> str:
    return f"Quote, word for word, the sentence about {rng.choice(p.quotes)} in the following {p.title}.\n\n{p.text}"


def _replace(rng: random.Random, p: Passage) -> str:
    old, new = rng.choice(p.replacements)
    return (f"Rewrite the following {p.title}, replacing every \"{old}\" with \"{new}\" and changing nothing "
            f"else.\n\n{p.text}")


def _fix_typos(rng: random.Random, p: Passage) -> str:
    return (f"Fix the typos in the following {p.title} and write out the corrected text in full.\n\n"
            f"{with_typos(p.text, rng, 4)}")


def _question(rng: random.Random, p: Passage) -> str:
    return (f"Read this {p.title} and answer the question, quoting the passage where you can.\n\n{p.text}\n\n"
            f"Question: {rng.choice(p.questions)}")


def _open_chat(rng: random.Random) -> str:
    return rng.choice(OPEN_CHAT_PROMPTS)


def _extractive(instruction: Callable[[random.Random, Passage], str]) -> Callable[[random.Random], str]:
    return lambda rng: instruction(rng, rng.choice(PASSAGES))


# Questions that want an explanation, asked for a short one. Creative requests (a poem, a story, a message) are
# left out: greedy decoding often loops on them until the budget runs out.
_SHORT_ANSWER_QUESTIONS = tuple(p for p in OPEN_CHAT_PROMPTS if not p.startswith(("Write", "Tell me a", "Describe")))
_SHORT_ANSWER = ("Keep it short: one paragraph.", "Answer in two or three sentences.", "Answer in about 80 words.")


def _short_answer(rng: random.Random) -> str:
    return f"{rng.choice(_SHORT_ANSWER_QUESTIONS)} {rng.choice(_SHORT_ANSWER)}"


_EXTRACTIVE_OUTPUT = (64, 128)


_CHAT = RequestClass("chat", 1.0, prompt_tokens=(32, 128), output_tokens=(32, 96))
_LONG = RequestClass("long", 1.0, prompt_tokens=(768, 1024), output_tokens=(16, 48))

WORKLOADS: dict[str, Workload] = {
    w.name: w for w in (
        Workload("chat", "short chat turns: 32-128 prompt tokens, 32-96 output tokens", (_CHAT,)),
        Workload("long", "long prompts: 768-1024 prompt tokens, 16-48 output tokens", (_LONG,)),
        Workload("mixed", "one long prompt (768-1024 tokens) per four short chat turns (32-128), seeded order",
                 (RequestClass("chat", 0.8, _CHAT.prompt_tokens, _CHAT.output_tokens),
                  RequestClass("long", 0.2, _LONG.prompt_tokens, _LONG.output_tokens))),
        Workload("batch1", "fixed 32 prompt / 64 output tokens, for the batch-1 decode probe",
                 (RequestClass("probe", 1.0, (32, 32), (64, 64)),)),
        Workload("extractive", "real text: repeat, quote from, edit, correct or answer from a 150-250 word passage "
                 "in the prompt (one user turn), 64-128 output tokens",
                 tuple(RequestClass(kind, 1.0, None, _EXTRACTIVE_OUTPUT, _extractive(build)) for kind, build in (
                     ("repeat", _repeat), ("quote", _quote), ("replace", _replace), ("fix-typos", _fix_typos),
                     ("question", _question)))),
        Workload("open-chat", "real text: open questions and requests (one user turn) whose answers are not in "
                 "the prompt, 64-128 output tokens",
                 (RequestClass("open-chat", 1.0, None, _EXTRACTIVE_OUTPUT, _open_chat),)),
        Workload("long-budget", "real text: open questions asking for a short answer (one user turn), "
                 "max_new_tokens 512; most answers end by end-of-sequence far sooner",
                 (RequestClass("short-answer", 1.0, None, (512, 512), _short_answer),)),
        Workload("multi-turn-chat", "token ids: conversations of 4-8 turns sharing one ~500-token system prompt, "
                 "each turn resending the history with the replies it got, 32-64 output tokens; a conversation's "
                 "turns in order", build=multi_turn_chat),
        Workload("document-qa", "token ids: 4-6 questions on each ~1,500-token document, one request each "
                 "(document + question), 32-64 output tokens; a document's questions in order", build=document_qa),
        Workload("smoke", "tiny: 8-24 prompt tokens, 4-8 output tokens (tests)",
                 (RequestClass("smoke", 1.0, (8, 24), (4, 8)),)),
    )
}


def make_requests(workload: Workload, num_requests: int, seed: int,
                  tokenizer: TextTokenizer | None = None) -> list[BenchRequest]:
    """num_requests requests of workload, the same for the same (workload, num_requests, seed); a session
    workload needs the model's tokenizer."""
    if num_requests < 1:
        raise ValueError(f"num_requests must be >= 1, got {num_requests}")
    rng = random.Random(f"{workload.name}:{seed}")
    if workload.build is not None:
        if tokenizer is None:
            raise ValueError(f"workload {workload.name} builds token ids with the model's chat template: "
                             "pass its tokenizer")
        return workload.build(num_requests, rng, tokenizer)
    kinds = _class_sequence(workload, num_requests, rng)
    requests = []
    for index, cls in enumerate(kinds):
        if cls.text is not None:
            max_new_tokens = rng.randint(*cls.output_tokens)
            requests.append(BenchRequest(index, cls.kind, (), max_new_tokens, text=cls.text(rng)))
            continue
        num_prompt = rng.randint(*cls.prompt_tokens)
        prompt = tuple(rng.randrange(_FIRST_ORDINARY_ID, _LAST_ORDINARY_ID) for _ in range(num_prompt))
        requests.append(BenchRequest(index, cls.kind, prompt, rng.randint(*cls.output_tokens)))
    return requests


def workload_requests(workloads: list[Workload], num_requests: int, seed: int, model_dir: Path,
                      max_new_tokens: int | None = None) -> dict[str, list[BenchRequest]]:
    """Each workload's requests (a session workload's token ids from model_dir's tokenizer); max_new_tokens,
    when given, replaces every request's."""
    tokenizer = TextTokenizer(model_dir) if any(w.needs_tokenizer for w in workloads) else None
    requests = {w.name: make_requests(w, num_requests, seed, tokenizer) for w in workloads}
    if max_new_tokens is not None:
        requests = {name: [replace(r, max_new_tokens=max_new_tokens) for r in reqs] for name, reqs in requests.items()}
    return requests


def _class_sequence(workload: Workload, num_requests: int, rng: random.Random) -> list[RequestClass]:
    """Each class gets round(weight share x num_requests) slots (at least one when it has weight), shuffled:
    a short run still holds its long prompts, at the intended share."""
    total = sum(c.weight for c in workload.classes)
    counts = [max(1, round(c.weight / total * num_requests)) for c in workload.classes]
    while sum(counts) > num_requests:
        counts[counts.index(max(counts))] -= 1
    counts[0] += num_requests - sum(counts)
    sequence = [cls for cls, count in zip(workload.classes, counts) for _ in range(count)]
    rng.shuffle(sequence)
    return sequence


def poisson_offsets_s(num_requests: int, rate_rps: float, seed: int) -> list[float]:
    """Arrival times (seconds from the start) of a Poisson process at rate_rps; the first arrives at 0."""
    if rate_rps <= 0:
        raise ValueError(f"rate must be > 0 requests/s, got {rate_rps}")
    rng = random.Random(f"arrivals:{seed}")
    offsets, t = [], 0.0
    for _ in range(num_requests):
        offsets.append(t)
        t += rng.expovariate(rate_rps)
    return offsets
