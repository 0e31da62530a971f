"""Long-context fidelity: quantisation errors accumulate over the context (every cached key and value carries
its own), so a format is also measured far into a long text and on retrieval from one.

- Perplexity, top-1 agreement and KL against the fp32 reference at 2k, 4k and 8k tokens of context: one
  causal pass over the first 8,192 tokens of evals/long/python-docs.txt, scored on the last 1,024 tokens
  before each mark (tokens 1,024-2,047, 3,072-4,095, 7,168-8,191, each predicted from all before it). Causal attention makes those
  positions' predictions exactly what windows of 2k, 4k and 8k tokens would give.
- Needle retrieval: a sentence holding a secret number is put into the same text at 25% and 75% of its
  depth, in prompts of 2k, 4k and 8k tokens (one chat turn ending in the question, the reply begun with "The
  secret number of the archive is"); correct when the greedy continuation holds the number. Reported per
  length, with whether each answer equals the reference's. Two depths, not more: each needle is a prefill of
  its whole length, and three depths took 6.5 minutes per configuration on two CPU cores.

The text is CPython's own documentation (pydoc_data.topics of Python 3.11, language reference chapters; PSF
licence, evals/long/README.md). A model may have seen it: perplexities are low, and only the differences
from fp32 mean anything.
"""

import math
import random
from dataclasses import dataclass, field
from pathlib import Path

import torch

from common.basics.tokenizer import TextTokenizer
from common.kv.pool import KvPool
from common.kv.wire import DTYPES as KV_DTYPES
from common.model.llama import LlamaModel, PrefillSpan
from common.model.runner import DecodeItem, ModelRunner, PrefillChunk

LONG_TEXT = Path(__file__).resolve().parents[2] / "evals" / "long" / "python-docs.txt"
CONTEXT_MARKS = (2048, 4096, 8192)
SCORED_TOKENS = 1024  # predicted tokens scored before each mark
NEEDLE_DEPTHS = (0.25, 0.75)
NEEDLE = "The secret number of the archive is {number}."
QUESTION = "What is the secret number of the archive mentioned in the text above? Answer with the number only."
ANSWER_START = "The secret number of the archive is"  # the reply begins so: the next tokens are the number
ANSWER_TOKENS = 8
CHUNK = 512  # prefill chunk: bounds the logits held at once
BLOCK_SIZE = 16


@dataclass
class Needle:
    length: int  # prompt and answer tokens, at most
    depth: float
    number: str
    prompt: list[int]


@dataclass
class LongContextResult:
    marks: dict[int, dict[str, float]] = field(default_factory=dict)  # mark -> perplexity, ppl_increase, ...
    needles: list[dict] = field(default_factory=list)  # length, depth, number, answer, correct, same_as_reference


class LongContext:
    """The long text and needles for one model's tokenizer, and the reference's figures once scored."""

    def __init__(self, model_dir: Path, marks: tuple[int, ...] = CONTEXT_MARKS,
                 scored_tokens: int = SCORED_TOKENS) -> None:
        if scored_tokens >= min(marks):
            raise ValueError(f"cannot score {scored_tokens} tokens before a mark at {min(marks)}")
        self.scored_tokens = scored_tokens
        self.tokenizer = TextTokenizer(model_dir)
        self.answer_start = self.tokenizer.encode(ANSWER_START)
        self.text = LONG_TEXT.read_text()
        self.marks = marks
        ids = self.tokenizer.encode(self.text)
        if len(ids) < max(marks):
            raise ValueError(f"{LONG_TEXT} holds {len(ids)} tokens, fewer than the longest mark {max(marks)}")
        self.ids = ids[:max(marks)]
        self.needles = [self._needle(length, depth) for length in marks for depth in NEEDLE_DEPTHS]
        self.reference_log_probs: dict[int, torch.Tensor] = {}
        self.reference_nll: dict[int, float] = {}
        self.reference_answers: list[str] = []

    def _needle(self, length: int, depth: float) -> Needle:
        number = str(random.Random(f"{length}/{depth}").randrange(10_000, 100_000))
        sentence = NEEDLE.format(number=number)
        limit = length - ANSWER_TOKENS  # the prompt and its answer fit the length
        budget = limit - len(self._chat("", sentence)) - 8  # room for the template, question and needle
        hay = self.tokenizer.decode(self.tokenizer.encode(self.text)[:budget])
        at = hay.rfind("\n", 0, int(depth * len(hay)))  # at a line break
        at = at if at > 0 else int(depth * len(hay))
        prompt = self._chat(hay[:at], sentence, hay[at:])
        while len(prompt) > limit:  # a cut may tokenise a little longer: trim the hay's end
            hay = hay[:-200]
            prompt = self._chat(hay[:at], sentence, hay[at:])
        return Needle(length, depth, number, prompt)

    def _chat(self, before: str, sentence: str, after: str = "") -> list[int]:
        content = f"{before.rstrip()}\n\n{sentence}\n\n{after.lstrip()}\n\n{QUESTION}"
        return self.tokenizer.apply_chat_template([{"role": "user", "content": content}]) + self.answer_start

    def evaluate(self, model: LlamaModel, kv_dtype: str = "float32") -> LongContextResult:
        """Scores a configuration; the first one evaluated is the reference the others are compared with."""
        is_reference = not self.reference_log_probs
        result = LongContextResult()
        for mark, log_probs in self._mark_log_probs(model, kv_dtype).items():
            targets = torch.tensor(self.ids[mark - self.scored_tokens:mark])[:, None]
            nll = -log_probs.gather(1, targets).sum().item()
            if is_reference:
                self.reference_log_probs[mark], self.reference_nll[mark] = log_probs, nll
            reference = self.reference_log_probs[mark]
            result.marks[mark] = {
                "perplexity": math.exp(nll / self.scored_tokens),
                "ppl_increase": math.exp((nll - self.reference_nll[mark]) / self.scored_tokens) - 1,
                "top1_agreement": (log_probs.argmax(-1) == reference.argmax(-1)).float().mean().item(),
                "mean_kl": (reference.exp() * (reference - log_probs)).sum(-1).mean().item(),
            }
        for index, needle in enumerate(self.needles):
            answer = self.tokenizer.decode(_greedy(model, needle.prompt, kv_dtype))
            if is_reference:
                self.reference_answers.append(answer)
            result.needles.append({"length": needle.length, "depth": needle.depth, "number": needle.number,
                                   "answer": answer, "correct": needle.number in answer,
                                   "same_as_reference": answer == self.reference_answers[index]})
        return result

    @torch.inference_mode()
    def _mark_log_probs(self, model: LlamaModel, kv_dtype: str) -> dict[int, torch.Tensor]:
        """mark -> (scored tokens, vocab) log-probabilities of the scored tokens up to the mark, from one causal
        pass in chunks. Position p's logits predict token p + 1."""
        n = len(self.ids)
        kv = _pool(model, n, kv_dtype)
        slots = torch.arange(n)
        wanted = {mark: range(mark - self.scored_tokens - 1, mark - 1) for mark in self.marks}  # predicting
        kept: dict[int, list[torch.Tensor]] = {mark: [] for mark in self.marks}
        for start in range(0, n, CHUNK):
            end = min(start + CHUNK, n)
            span = PrefillSpan(offset=0, num_tokens=end - start, start=start, context_slots=slots[:end])
            logits = model.prefill(torch.tensor(self.ids[start:end]), slots[start:end], slots[start:end], [span], kv,
                                   every_position=True)
            for mark, positions in wanted.items():
                lo, hi = max(positions.start, start), min(positions.stop, end)
                if lo < hi:
                    kept[mark].append(torch.log_softmax(logits[lo - start:hi - start].float(), dim=-1))
        return {mark: torch.cat(parts) for mark, parts in kept.items()}


def _pool(model: LlamaModel, tokens: int, kv_dtype: str) -> KvPool:
    c = model.config
    return KvPool(num_layers=c.num_layers, num_blocks=-(-tokens // BLOCK_SIZE) + 1, block_size=BLOCK_SIZE,
                  num_kv_heads=c.num_kv_heads, head_dim=c.head_dim, dtype=KV_DTYPES[kv_dtype], device=model.device)


@torch.inference_mode()
def _greedy(model: LlamaModel, prompt: list[int], kv_dtype: str) -> list[int]:
    """Greedy answer to one long prompt, prefilled in chunks; stops at an end-of-sequence token."""
    kv = _pool(model, len(prompt) + ANSWER_TOKENS, kv_dtype)
    table = list(range(kv.num_blocks))
    runner = ModelRunner(model, kv)
    for start in range(0, len(prompt), CHUNK):
        logits = runner.run_prefill([PrefillChunk(prompt[start:start + CHUNK], start, table)])
    out, eos = [int(logits[0].argmax())], set(model.config.eos_token_ids)
    while len(out) < ANSWER_TOKENS and out[-1] not in eos:
        logits = runner.run_decode([DecodeItem(out[-1], len(prompt) + len(out) - 1, table)])
        out.append(int(logits[0].argmax()))
    return [t for t in out if t not in eos]
