"""What a request asks of token choice: greedy, or temperature / top-k / top-p with a per-request seed.
Validated on construction (torch-free: the gateway checks requests with it; common/model/sampling.py draws)."""

import math
from dataclasses import dataclass

# Below this, logits / temperature can overflow float32; such a temperature is greedy in all but name.
GREEDY_BELOW_TEMPERATURE = 1e-5


# OpenAI's range for presence_penalty and frequency_penalty.
MAX_ADDITIVE_PENALTY = 2.0
# The most alternatives a tier reports per position, whatever a gateway allows (bounds the work per token).
MAX_LOGPROBS = 100


@dataclass(frozen=True)
class TokenLogprob:
    """A generated token's log-probability and the most likely tokens at its position, under the model's own
    distribution (log-softmax of the raw logits)."""

    logprob: float
    top: tuple[tuple[int, float], ...] = ()  # (token id, log-probability), most likely first


@dataclass(frozen=True)
class SamplingConfig:
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0
    # transformers' RepetitionPenaltyLogitsProcessor over prompt and output: > 1 discourages repeats (1: off)
    repetition_penalty: float = 1.0
    # OpenAI's, over the output only: minus presence_penalty once a token appeared, minus frequency_penalty per time
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    # While fewer than min_new_tokens were generated, suppress_token_ids (the request's stop tokens) cannot be chosen
    min_new_tokens: int = 0
    suppress_token_ids: frozenset[int] = frozenset()
    # None: no log-probabilities; N: each token's and the N most likely alternatives' (TokenLogprob)
    logprobs: int | None = None
    # An llguidance grammar the output must follow (common/basics/grammar.py); "" for none
    grammar: str = ""

    def __post_init__(self) -> None:
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ValueError(f"temperature must be a finite number >= 0 (0 means greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not (math.isfinite(self.repetition_penalty) and self.repetition_penalty > 0):
            raise ValueError(f"repetition_penalty must be a finite number > 0 (1 means off), "
                             f"got {self.repetition_penalty}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not (math.isfinite(value) and abs(value) <= MAX_ADDITIVE_PENALTY):
                raise ValueError(f"{name} must be in [-{MAX_ADDITIVE_PENALTY:g}, {MAX_ADDITIVE_PENALTY:g}], "
                                 f"got {value}")
        if self.min_new_tokens < 0:
            raise ValueError(f"min_new_tokens must be >= 0, got {self.min_new_tokens}")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise ValueError(f"logprobs must be in [0, {MAX_LOGPROBS}], got {self.logprobs}")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW_TEMPERATURE


    @property
    def shapes_logits(self) -> bool:
        """Whether logits are changed before a token is chosen (penalties, or a minimum length to hold)."""
        return (self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0
                or (self.min_new_tokens > 0 and bool(self.suppress_token_ids)))
