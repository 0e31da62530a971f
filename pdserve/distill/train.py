"""Training the draft on the target's own distributions (soft cross-entropy = KL up to the teacher's
entropy), under a wall-clock deadline: AdamW, a short warm-up, then a cosine decay over the time left.

Only positions that predict an answer token are scored; the prompt is context. Teacher mass on tokens
outside the draft's head is lost to it (it can never propose them), so it is left out of the loss.
"""

import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from pdserve.distill.corpus import Sample
from pdserve.distill.student import StudentLlama

_WARMUP_STEPS = 20


@dataclass(frozen=True)
class Batch:
    token_ids: torch.Tensor  # (batch, tokens) right-padded inputs
    rows: torch.Tensor  # (scored,) flat indices into batch * tokens of positions that predict an answer token
    teacher_index: torch.Tensor  # (scored, top_k) column in the draft's head, -1 where the token is not in it
    teacher_probs: torch.Tensor  # (scored, top_k)


@dataclass
class Evaluation:
    loss: float  # soft cross-entropy per scored token
    agreement: float  # share of positions where the draft's top token is the target's


def make_batches(samples: list[Sample], head_ids: torch.Tensor, batch_tokens: int, rng: random.Random) -> list[Batch]:
    """Samples grouped by length into batches of about batch_tokens padded tokens, in a shuffled order."""
    column = torch.full((int(head_ids.max()) + 1,), -1, dtype=torch.long)
    column[head_ids] = torch.arange(len(head_ids))
    ordered = sorted(samples, key=lambda s: len(s.token_ids))
    groups, group = [], []
    for sample in ordered:
        if group and (len(group) + 1) * (len(sample.token_ids) - 1) > batch_tokens:
            groups.append(group)
            group = []
        group.append(sample)
    groups += [group] if group else []
    rng.shuffle(groups)
    return [_batch(g, column) for g in groups]


def _batch(samples: list[Sample], column: torch.Tensor) -> Batch:
    length = max(len(s.token_ids) - 1 for s in samples)  # the last token is never an input
    ids = torch.zeros(len(samples), length, dtype=torch.long)
    rows, teacher_ids, teacher_probs = [], [], []
    for b, s in enumerate(samples):
        inputs = s.token_ids[:-1]
        ids[b, :len(inputs)] = torch.tensor(inputs)
        first = s.num_prompt_tokens - 1  # this position predicts answer token 0
        rows.append(torch.arange(first, first + s.num_answer_tokens) + b * length)
        teacher_ids.append(s.teacher_ids)
        teacher_probs.append(s.teacher_probs)
    teacher_ids = torch.cat(teacher_ids)  # (scored, top_k)
    in_range = teacher_ids < len(column)
    index = torch.where(in_range, column[teacher_ids.clamp(max=len(column) - 1)], -1)
    return Batch(ids, torch.cat(rows), index, torch.cat(teacher_probs))


def batch_loss(student: StudentLlama, batch: Batch) -> tuple[torch.Tensor, float]:
    """(soft cross-entropy per scored token, share where the draft's top token is the target's top token)."""
    hidden = student.hidden(batch.token_ids).flatten(0, 1)[batch.rows]  # (scored, hidden)
    log_q = torch.log_softmax(student.head_logits(hidden), dim=-1)  # (scored, head tokens)
    known = batch.teacher_index >= 0
    picked = log_q.gather(1, batch.teacher_index.clamp(min=0))  # (scored, top_k)
    loss = -(batch.teacher_probs * picked * known).sum(dim=1).mean()
    agree = (log_q.argmax(dim=1) == batch.teacher_index[:, 0]).float().mean()
    return loss, float(agree)


@torch.no_grad()
def evaluate(student: StudentLlama, batches: list[Batch]) -> Evaluation:
    losses, agrees, weights = [], [], []
    for batch in batches:
        loss, agree = batch_loss(student, batch)
        losses.append(float(loss))
        agrees.append(agree)
        weights.append(len(batch.rows))
    total = sum(weights) or 1
    return Evaluation(sum(l * w for l, w in zip(losses, weights)) / total,
                      sum(a * w for a, w in zip(agrees, weights)) / total)


def train(student: StudentLlama, batches: list[Batch], deadline: float, lr: float, rng: random.Random,
          on_log: Callable[[dict], None], held_out: list[Batch], log_every_s: float = 60.0,
          max_steps: int | None = None) -> dict:
    """Steps over `batches` (reshuffled each epoch) until the monotonic deadline (or max_steps); every log_every_s scores
    `held_out` and keeps the best weights so far, which the student holds on return (a small corpus is
    learnt by heart within minutes). Returns the totals."""
    params = [p for p in student.parameters() if p.requires_grad]
    optimiser = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    started = last_log = time.monotonic()
    step = epoch = 0
    recent: list[tuple[float, float]] = []
    best = _Best(evaluate(student, held_out).loss, 0, _copy(params))
    limit = max_steps if max_steps is not None else float("inf")
    while time.monotonic() < deadline and step < limit:
        order = list(batches)
        rng.shuffle(order)
        for batch in order:
            now = time.monotonic()
            if now >= deadline or step >= limit:
                break
            progress = (now - started) / max(deadline - started, 1e-9)
            for group in optimiser.param_groups:
                group["lr"] = lr * min(1.0, (step + 1) / _WARMUP_STEPS) * 0.5 * (1 + math.cos(math.pi * progress))
            loss, agree = batch_loss(student, batch)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimiser.step()
            step += 1
            recent.append((float(loss.detach()), agree))
            if now - last_log >= log_every_s:
                scored = evaluate(student, held_out)
                if scored.loss < best.loss:
                    best = _Best(scored.loss, step, _copy(params))
                on_log({"step": step, "epoch": epoch, "elapsed_s": round(now - started, 1),
                        "loss": round(sum(l for l, _ in recent) / len(recent), 4),
                        "agreement": round(sum(a for _, a in recent) / len(recent), 4),
                        "held_out_loss": round(scored.loss, 4), "held_out_agreement": round(scored.agreement, 4)})
                recent, last_log = [], now
        epoch += 1
    kept = step
    if evaluate(student, held_out).loss > best.loss:
        kept = best.step
        with torch.no_grad():
            for param, saved in zip(params, best.params):
                param.copy_(saved)
    return {"steps": step, "epochs_started": epoch, "seconds": round(time.monotonic() - started, 1),
            "kept_weights_of_step": kept}


@dataclass
class _Best:
    loss: float
    step: int
    params: list[torch.Tensor]


def _copy(params: list[torch.Tensor]) -> list[torch.Tensor]:
    return [p.detach().clone() for p in params]
