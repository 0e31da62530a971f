"""Client helpers for the integration tests."""

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

    from common.cli import main

    before = stack.decode_stats()
    code = main(["bench", "--address", stack.gateway_address, "--stats-address", stack.decode_address,
                 "--warmup", "0", "--no-progress", "--out", str(out), *args])
    after = stack.decode_stats()
    summary = json.loads((out / "summary.json").read_text())
    records = [json.loads(line) for line in (out / "requests.jsonl").read_text().splitlines()]
    return code, out, summary, records, before, after
