"""Chooses next tokens from logits: greedy, or temperature / top-k / top-p with a per-request seed.

Token i of a request is drawn with a generator seeded from (seed, i), so a seeded request gives the
same tokens whichever tier samples it and whatever batch it shares.
"""

from collections.abc import Sequence

import torch

from common.basics.sampling import SamplingConfig

_SEED_MIX = 1_000_003


def sample(logits: torch.Tensor, configs: Sequence[SamplingConfig], steps: Sequence[int]) -> list[int]:
    """logits: (batch, vocab); steps[i] is the index of the token being drawn for row i."""
    tokens = logits.argmax(dim=-1).tolist()
    for row, (config, step) in enumerate(zip(configs, steps)):
        if not config.greedy:
            tokens[row] = _sample_row(logits[row], config, step)
    return tokens


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
