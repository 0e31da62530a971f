"""Running one configuration over the suites: next-token log-probabilities for every position of the
perplexity texts, and greedy completions of the task prompts, through the serving model code itself."""

import torch

from common.basics.tokenizer import TextTokenizer
from common.kv.pool import KvPool
from common.kv.wire import DTYPES as KV_DTYPES
from common.model.llama import LlamaModel, PrefillSpan
from common.model.runner import DecodeItem, ModelRunner, PrefillChunk

BLOCK_SIZE = 16
MAX_BATCH = 64  # task prompts per greedy batch


class Scorer:
    def __init__(self, model: LlamaModel, tokenizer: TextTokenizer, max_tokens: int,
                 kv_dtype: str = "float32") -> None:
        c = model.config
        self.model, self.tokenizer = model, tokenizer
        self.kv = KvPool(num_layers=c.num_layers, num_blocks=-(-max_tokens // BLOCK_SIZE) + 1, block_size=BLOCK_SIZE,
                         num_kv_heads=c.num_kv_heads, head_dim=c.head_dim, dtype=KV_DTYPES[kv_dtype], device=model.device)
        self.runner = ModelRunner(model, self.kv)

    @torch.inference_mode()
    def log_probs(self, token_ids: list[int]) -> torch.Tensor:
        """(len - 1, vocab) log-probabilities of the token after each position but the last.
        One prefill whose spans are single tokens, so the model returns logits at every position."""
        n = len(token_ids)
        slots = torch.arange(n, device=self.kv.device)
        spans = [PrefillSpan(offset=i, num_tokens=1, start=i, context_slots=slots[: i + 1]) for i in range(n)]
        ids = torch.tensor(token_ids, device=self.kv.device)
        logits = self.model.prefill(ids, slots.clone(), slots, spans, self.kv)[:-1]  # (n - 1, vocab)
        return torch.log_softmax(logits.float(), dim=-1).cpu()

    def greedy(self, prompts: list[list[int]], max_new_tokens: list[int]) -> list[list[int]]:
        """Greedy completions of all prompts (each stops at an end-of-sequence token), run in batches of at most
        MAX_BATCH prompts that fit the scorer's KV pool, in order."""
        blocks = [-(-(len(ids) + limit) // BLOCK_SIZE) for ids, limit in zip(prompts, max_new_tokens)]
        completions = []
        for batch in batches(blocks, self.kv.num_blocks, MAX_BATCH):
            completions += self._greedy_batch([prompts[i] for i in batch], [max_new_tokens[i] for i in batch])
        return completions

    @torch.inference_mode()
    def _greedy_batch(self, prompts: list[list[int]], max_new_tokens: list[int]) -> list[list[int]]:
        tables, next_block = [], 0
        for ids, limit in zip(prompts, max_new_tokens):
            count = -(-(len(ids) + limit) // BLOCK_SIZE)
            tables.append(list(range(next_block, next_block + count)))
            next_block += count
        logits = self.runner.run_prefill([PrefillChunk(ids, 0, t) for ids, t in zip(prompts, tables)])
        outputs = [[int(t)] for t in logits.argmax(dim=-1).tolist()]
        eos = set(self.model.config.eos_token_ids)
        while True:
            live = [i for i, out in enumerate(outputs) if len(out) < max_new_tokens[i] and out[-1] not in eos]
            if not live:
                return [[t for t in out if t not in eos] for out in outputs]
            items = [DecodeItem(outputs[i][-1], len(prompts[i]) + len(outputs[i]) - 1, tables[i]) for i in live]
            for i, token in zip(live, self.runner.run_decode(items).argmax(dim=-1).tolist()):
                outputs[i].append(int(token))

    def encode(self, prompt: str, chat: bool) -> list[int]:
        if chat:
            return self.tokenizer.apply_chat_template([{"role": "user", "content": prompt}])
        return self.tokenizer.encode(prompt)


def batches(num_blocks: list[int], capacity: int, max_batch: int) -> list[list[int]]:
    """Indices of consecutive prompts grouped so that no group needs more than `capacity` KV blocks or holds
    more than `max_batch` prompts."""
    groups: list[list[int]] = []
    used = capacity + 1
    for index, blocks in enumerate(num_blocks):
        if blocks > capacity:
            raise ValueError(f"a task prompt needs {blocks} KV blocks, the scorer's pool holds {capacity}; "
                             "raise max_tokens")
        if used + blocks > capacity or len(groups[-1]) == max_batch:
            groups.append([])
            used = 0
        groups[-1].append(index)
        used += blocks
    return groups
