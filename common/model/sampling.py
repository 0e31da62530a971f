"""Chooses next tokens from logits: greedy, or temperature / top-k / top-p with a per-request seed.

Token i of a request is drawn with a generator seeded from (seed, i), so a seeded request gives the
same tokens whichever tier samples it and whatever batch it shares.
"""

from collections.abc import Sequence

import torch

from common.basics.sampling import SamplingConfig, TokenLogprob

_SEED_MIX = 1_000_003


def sample(logits: torch.Tensor, configs: Sequence[SamplingConfig], steps: Sequence[int],
           contexts: Sequence[Sequence[int]] | None = None, masks: Sequence[torch.Tensor | None] | None = None
           ) -> list[int]:
    """logits: (batch, vocab); steps[i] is the index of the token being drawn for row i (how many tokens the
    request generated before it) and contexts[i] every token before it, prompt and output: required when a
    config has penalties or a minimum length (SamplingConfig.shapes_logits). masks[i]: (vocab,) bool, the tokens
    row i may choose (a grammar's, common/model/constraint.py); None: any."""
    shaped = [row for row, config in enumerate(configs) if config.shapes_logits]
    constrained = [row for row, mask in enumerate(masks or ()) if mask is not None]
    if shaped or constrained:
        if shaped and contexts is None:
            raise ValueError("penalties and min_new_tokens need each row's context")
        logits = logits.clone()
        for row in shaped:
            logits[row] = shape(logits[row], configs[row], contexts[row], steps[row])
        for row in constrained:
            logits[row] = logits[row].masked_fill(~masks[row].to(logits.device), float("-inf"))
    tokens = logits.argmax(dim=-1).tolist()
    for row, (config, step) in enumerate(zip(configs, steps)):
        if not config.greedy:
            tokens[row] = _sample_row(logits[row], config, step)
    return tokens


def shape(logits: torch.Tensor, config: SamplingConfig, context: Sequence[int], step: int) -> torch.Tensor:
    """One row's logits (vocab,) as the request's penalties and minimum length leave them, for the token drawn
    after `context` (whose last `step` tokens are the output so far). A new tensor; `logits` is not changed.

    Applied in transformers' and vLLM's order: repetition penalty (over prompt and output), then presence and
    frequency penalties (over the output), then the stop tokens held back while fewer than min_new_tokens were
    generated."""
    logits = logits.clone()
    vocab = logits.shape[-1]
    if config.repetition_penalty != 1.0 and context:
        seen = torch.tensor(sorted(set(context)), dtype=torch.long, device=logits.device)
        scores = logits[seen]
        logits[seen] = torch.where(scores > 0, scores / config.repetition_penalty, scores * config.repetition_penalty)
    if (config.presence_penalty or config.frequency_penalty) and step:
        output = torch.tensor(context[len(context) - step:], dtype=torch.long, device=logits.device)
        counts = torch.bincount(output, minlength=vocab).to(logits.dtype)
        logits -= config.frequency_penalty * counts + config.presence_penalty * (counts > 0).to(logits.dtype)
    if step < config.min_new_tokens:
        held = [i for i in config.suppress_token_ids if i < vocab]
        logits[held] = float("-inf")
    return logits


def _sample_row(logits: torch.Tensor, config: SamplingConfig, step: int) -> int:
    return draw(probabilities(logits, config), config, step)


def probabilities(logits: torch.Tensor, config: SamplingConfig) -> torch.Tensor:
    """The distribution a sampled token is drawn from: temperature, then top-k, then top-p. (vocab,) on CPU."""
    scaled = logits.float().cpu() / config.temperature  # (vocab,); the seeded generator lives on the CPU
    if config.top_k:
        kth = torch.topk(scaled, min(config.top_k, scaled.numel())).values[-1]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    if config.top_p < 1:
        sorted_logits, order = torch.sort(scaled, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # Drop a token when the tokens before it already reach top_p; the first always stays.
        drop = probs.cumsum(dim=-1) - probs >= config.top_p
        scaled = scaled.index_fill(0, order[drop], float("-inf"))
    return torch.softmax(scaled, dim=-1)


def draw(probs: torch.Tensor, config: SamplingConfig, step: int) -> int:
    """One token from probs (vocab,), from the request's generator for token `step`."""
    return int(torch.multinomial(probs, 1, generator=_generator(config, step)))


def uniform(config: SamplingConfig, step: int) -> float:
    """A U(0, 1) number for token `step`, independent of the stream `draw` uses."""
    return float(torch.rand(1, generator=_generator(config, step, stream=1)))


def _generator(config: SamplingConfig, step: int, stream: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed((config.seed * _SEED_MIX + step * 2 + stream) % 2**63)


def token_logprobs(logits: torch.Tensor, tokens: Sequence[int], top_n: int) -> list[TokenLogprob]:
    """logits: (len(tokens), vocab), row i the raw logits at the position tokens[i] was chosen for. Each token's
    log-probability under log-softmax(logits) in float32, and the top_n most likely tokens'."""
    logp = torch.log_softmax(logits.float(), dim=-1)  # (rows, vocab)
    chosen = logp.gather(-1, torch.tensor(tokens, device=logp.device)[:, None])[:, 0].tolist()
    if top_n:
        values, ids = logp.topk(min(top_n, logp.shape[-1]), dim=-1)
        tops = [tuple(zip(i, v)) for i, v in zip(ids.tolist(), values.tolist())]
    else:
        tops = [()] * len(tokens)
    return [TokenLogprob(lp, top) for lp, top in zip(chosen, tops)]
