"""Replays prompt lookup over the extractive bench requests' greedy answers: which proposer settings pay.

Greedy answers come from Hugging Face transformers on the default model (cached in
bench-results/prompt-lookup-replay/greedy.json; about 10 minutes on one thread the first time). Each
request is replayed step by step with the decode tier's adaptive k (SpecState); a step verifying k drafts
costs COSTS[k] plain steps (the decode tier's start-up calibration, 2026-11-24, blocked weight layout; k > 4
interpolated from scripts/micro/blocked_weights.py). Prints tokens per plain-step-equivalent, token-weighted
(tw) and the median request, for the bench's seeds 0 (8 requests), 1 and 2 (16 each).

    .venv/bin/python scripts/micro/prompt_lookup_replay.py
"""
import json
import statistics
from pathlib import Path

import torch
from micro_setup import MODEL_DIR, print_machine

from decode_svc.speculation import PromptLookupProposer, SpecState

COSTS = [1.00, 1.41, 1.48, 1.56, 1.68, 1.74, 1.80, 1.86, 1.91]
CACHE = Path("bench-results/prompt-lookup-replay/greedy.json")


def greedy_answers() -> list[dict]:
    if CACHE.exists():
        return json.loads(CACHE.read_text())
    from transformers import AutoModelForCausalLM

    from common.basics.tokenizer import TextTokenizer
    from pdserve.bench.workloads import WORKLOADS, make_requests
    torch.set_num_threads(1)
    tok, model = TextTokenizer(MODEL_DIR), AutoModelForCausalLM.from_pretrained(MODEL_DIR, dtype=torch.float32).eval()
    out = []
    for seed, n in ((0, 8), (1, 16), (2, 16)):
        for r in make_requests(WORKLOADS["extractive"], n, seed):
            ids = tok.apply_chat_template([{"role": "user", "content": r.text}])
            with torch.no_grad():
                g = model.generate(torch.tensor([ids]), max_new_tokens=r.max_new_tokens, do_sample=False)
            out.append(dict(seed=seed, index=r.index, kind=r.kind, prompt=ids, gen=g[0, len(ids):].tolist()))
    CACHE.parent.mkdir(parents=True, exist_ok=True)
    CACHE.write_text(json.dumps(out))
    return out


def replay(req: dict, proposer, max_k: int, adaptive: bool = True) -> tuple[int, float]:
    """(decode tokens after the first, their cost in plain steps)."""
    prompt, gen = req["prompt"], req["gen"]
    state = SpecState(max_k=max_k, step_costs=tuple(COSTS[:max_k + 1]), adaptive=adaptive)
    i, cost = 1, 0.0  # the first token comes from prefill
    while i < len(gen):
        k = state.next_k()
        proposal = proposer.propose(prompt + gen[:i], k) if k else []
        accepted = 0
        while accepted < len(proposal) and i + accepted < len(gen) and proposal[accepted] == gen[i + accepted]:
            accepted += 1
        if proposal:
            state.record(len(proposal), accepted)
        cost += COSTS[len(proposal)]
        i += accepted + 1
    return len(gen) - 1, cost


def main() -> None:
    print_machine()
    data = greedy_answers()
    for name, proposer, max_k, adaptive in (
            ("n-grams 3..1, k <= 4 (before)", PromptLookupProposer(3, 1), 4, True),
            ("n-grams 3..1, k <= 8", PromptLookupProposer(3, 1), 8, True),
            ("n-grams 5..2, k <= 4", PromptLookupProposer(5, 2), 4, True),
            ("n-grams 5..2, k <= 8 (now)", PromptLookupProposer(5, 2), 8, True),
            ("n-grams 5..2, k = 8 fixed", PromptLookupProposer(5, 2), 8, False),
            ("n-grams 5..3, k <= 8", PromptLookupProposer(5, 3), 8, True)):
        cells = []
        for seed in (0, 1, 2):
            runs = [replay(r, proposer, max_k, adaptive) for r in data if r["seed"] == seed and len(r["gen"]) > 1]
            tw = sum(t for t, _ in runs) / sum(c for _, c in runs)
            cells.append(f"seed {seed}: tw {tw:.2f} median {statistics.median(t / c for t, c in runs):.2f}")
        print(f"{name:32s} " + " | ".join(cells), flush=True)


if __name__ == "__main__":
    main()
