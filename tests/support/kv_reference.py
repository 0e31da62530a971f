"""An independent reference for KV caches stored in fewer bits: transformers' own KV cache, made to store
each new key and value as a 16-bit pool rounds them, so the attention of every later position reads them
back rounded, exactly where the project's pool does (after rotary, before attention)."""

import torch
from transformers import DynamicCache


class RoundingCache(DynamicCache):
    """transformers' DynamicCache holding K and V rounded to `dtype` (and widened back for the arithmetic)."""

    def __init__(self, dtype: torch.dtype) -> None:
        super().__init__()
        self.dtype = dtype

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        rounded = [states.to(self.dtype).to(states.dtype) for states in (key_states, value_states)]
        return super().update(*rounded, layer_idx, *args, **kwargs)


def logits_with_rounded_kv(model, token_ids: list[int], dtype: torch.dtype) -> torch.Tensor:
    """(tokens, vocab) logits of model over token_ids, its KV cache rounded to dtype. Fed one token at a time,
    so each position attends over K and V that were stored (rounded) before it, itself included."""
    cache, rows = RoundingCache(dtype), []
    with torch.no_grad():
        for position, token in enumerate(token_ids):
            out = model(torch.tensor([[token]]), past_key_values=cache, use_cache=True,
                        position_ids=torch.tensor([[position]]))
            rows.append(out.logits[0, -1])
    return torch.stack(rows)
