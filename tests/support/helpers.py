"""Client helpers for the integration tests."""

import os
import time
from pathlib import Path

import pytest
import torch

from pdserve.v1 import gateway_pb2


def request(prompt: str | None = None, *, messages=None, token_ids=None, max_new_tokens: int | None = 16,
            **fields) -> gateway_pb2.GenerateRequest:
    req = gateway_pb2.GenerateRequest(**fields)
    if prompt is not None:
        req.prompt = prompt
    if messages is not None:
        for role, content in messages:
            req.messages.messages.add(role=role, content=content)
    if token_ids is not None:
        req.prompt_token_ids.ids.extend(token_ids)
    if max_new_tokens is not None:
        req.max_new_tokens = max_new_tokens
    return req


def collect(stub, req, timeout: float = 300):
    """(token ids, text, last message) of one streamed generation."""
    token_ids, text, last = [], "", None
    for reply in stub.Generate(req, timeout=timeout):
        token_ids.extend(reply.token_ids)
        text += reply.text
        last = reply
    return token_ids, text, last


def assert_greedy_matches(hf_model, prompt_ids: list[int], got: list[int], expected: list[int]) -> None:
    """got, the service's greedy tokens, equals transformers' `expected` token for token, up to the first
    choice transformers made by less than four float32 decoder bounds (tests/bounds.py: each side's logits
    are within one bound of the exact ones, and a choice turns only on a gap that small); the prompts here
    have none, so that is the whole sequence, and it must be at least half of it."""
    from bounds import decoder_tolerance

    from common.basics.model_config import ModelConfig

    model = hf_model[0]
    config = ModelConfig.from_dir(Path(model.name_or_path))
    with torch.no_grad():
        logits = model(torch.tensor([prompt_ids + expected])).logits[0, len(prompt_ids) - 1:-1]  # (new, vocab)
    top2 = logits.topk(2, dim=-1).values
    decided = [float(a - b) > 4 * decoder_tolerance(config, row) for (a, b), row in zip(top2, logits)]
    kept = decided.index(False) if False in decided else len(expected)
    assert kept >= len(expected) // 2, f"the reference has near-ties from token {kept}: choose another prompt"
    assert got[:kept] == expected[:kept] and (kept < len(expected) or got == expected), (got, expected, kept)


def hf_greedy(hf_model, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    model, tokenizer = hf_model
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=max_new_tokens, do_sample=False,
                             eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id,
                             attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long))
    return out[0, len(prompt_ids):].tolist()




def run_bench(stack, out, *args: str) -> tuple:
    """`pdserve bench` against the test stack, writing to out: (exit code, out, summary, request records,
    decode Stats before, decode Stats after)."""
    import json

    from pdserve.cli import main

    before = stack.decode_stats()
    from stack import CERTS_DIR

    code = main(["bench", "--address", stack.gateway_address, "--stats-address", stack.decode_address,
                 "--certs-dir", str(CERTS_DIR),
                 "--warmup", "0", "--no-progress", "--out", str(out), *args])
    after = stack.decode_stats()
    summary = json.loads((out / "summary.json").read_text())
    records = [json.loads(line) for line in (out / "requests.jsonl").read_text().splitlines()]
    return code, out, summary, records, before, after


def wait_for(condition, timeout_s: float, what: str):
    """condition()'s first truthy value, polled every 50 ms; fails the test naming `what` after timeout_s."""
    deadline = time.monotonic() + timeout_s
    while not (value := condition()):
        assert time.monotonic() < deadline, f"not within {timeout_s} s: {what}"
        time.sleep(0.05)
    return value


def require_nixl() -> None:
    """Skips a test that needs NIXL where it is not installed, unless PDSERVE_REQUIRE_NIXL=1 (`make test`, which
    installs it): there its absence fails the test instead, so the NIXL tests cannot quietly stop running."""
    from common.kv.nixl_transport import INSTALL_HINT, nixl_installed

    if nixl_installed():
        return
    message = f"NIXL is not installed: {INSTALL_HINT}"
    if os.environ.get("PDSERVE_REQUIRE_NIXL") == "1":
        pytest.fail(message + " (PDSERVE_REQUIRE_NIXL=1: `make test` installs it)")
    pytest.skip(message)
