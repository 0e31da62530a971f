"""The `hf-static` peer: Hugging Face transformers `generate` with static batching, served as a
pdserve.v1.Gateway so the same load generator drives it.

Requests are grouped as they arrive: while a batch runs, new requests wait; when it ends, every waiting
request (up to --max-batch-size) forms the next batch, left-padded to its longest prompt, and runs until
each row has its EOS or its own max_new_tokens (finished rows keep their slot, padded, until the batch
ends). Tokens stream to each client as the batch produces them. Decode.Stats reports the batch size, so the
harness samples it as it does pdserve's decode tier.

    python -m pdserve.bench.hf_static --model DIR --port N [--max-batch-size 32]
"""

import argparse
import os
import queue
import threading
import time
from dataclasses import dataclass, field

import grpc
import torch
from transformers import LlamaForCausalLM, StoppingCriteria, StoppingCriteriaList

from common.edge.server import (
    add_health,
    bind,
    make_server,
    set_serving,
    wait_for_signal,
)
from pdserve.bench.replies import last_reply
from pdserve.v1 import (
    common_pb2,
    decode_pb2,
    decode_pb2_grpc,
    gateway_pb2,
    gateway_pb2_grpc,
)

_DONE = None  # end of a request's token queue
_POLL_S = 0.25


@dataclass
class Slot:
    prompt_ids: list[int]
    max_new_tokens: int
    tokens: "queue.Queue[int | None]" = field(default_factory=queue.Queue)
    num_generated: int = 0
    finish_reason: str = ""
    cancelled: bool = False  # the client went away: dropped while waiting, stopped early in a batch


class RowStreamer:
    """transformers streamer: generate() puts the prompt once, then each step's tokens, shape (batch,)."""

    def __init__(self, slots: list[Slot], eos_ids: frozenset[int], counters: dict) -> None:
        self.slots, self.eos_ids, self.counters = slots, eos_ids, counters
        self._seen_prompt = False

    def put(self, value: torch.Tensor) -> None:
        if not self._seen_prompt:
            self._seen_prompt = True
            return
        self.counters["steps"] += 1
        self.counters["tokens"] += len(self.slots)
        for slot, token in zip(self.slots, value.reshape(-1).tolist()):
            if slot.finish_reason or slot.cancelled:
                continue
            slot.num_generated += 1
            slot.tokens.put(token)
            if token in self.eos_ids or slot.num_generated >= slot.max_new_tokens:
                slot.finish_reason = "stop" if token in self.eos_ids else "length"
                slot.tokens.put(_DONE)

    def end(self) -> None:
        close(self.slots)


def close(slots: list[Slot]) -> None:
    """Ends every stream still open (the batch ended, or failed)."""
    for slot in slots:
        if not slot.finish_reason:
            slot.finish_reason = "length"
            slot.tokens.put(_DONE)


class RowLimits(StoppingCriteria):
    """Each row stops at its own max_new_tokens (generate's max_new_tokens is the batch's largest), or when
    its client has gone; the batch ends when every row has stopped."""

    def __init__(self, prompt_width: int, slots: list[Slot]) -> None:
        self.prompt_width, self.slots = prompt_width, slots
        self.limits = torch.tensor([s.max_new_tokens for s in slots])

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        cancelled = torch.tensor([s.cancelled for s in self.slots])
        return ((input_ids.shape[1] - self.prompt_width) >= self.limits) | cancelled  # (batch,) bool


class StaticBatcher:
    def __init__(self, model, pad_id: int, eos_ids: frozenset[int], max_batch_size: int) -> None:
        self.model, self.pad_id, self.eos_ids, self.max_batch_size = model, pad_id, eos_ids, max_batch_size
        self.waiting: "queue.Queue[Slot]" = queue.Queue()
        self.running = 0
        self.counters = {"steps": 0, "tokens": 0, "batch_max": 0}
        threading.Thread(target=self._loop, daemon=True).start()

    def submit(self, prompt_ids: list[int], max_new_tokens: int) -> Slot:
        slot = Slot(prompt_ids, max_new_tokens)
        self.waiting.put(slot)
        return slot

    def _loop(self) -> None:
        while True:
            batch = [self.waiting.get()]
            while len(batch) < self.max_batch_size and not self.waiting.empty():
                batch.append(self.waiting.get_nowait())
            batch = [slot for slot in batch if not slot.cancelled]
            if not batch:
                continue
            self.running = len(batch)
            self.counters["batch_max"] = max(self.counters["batch_max"], len(batch))
            try:
                self._run(batch)
            finally:
                self.running = 0
                close(batch)

    @torch.inference_mode()
    def _run(self, batch: list[Slot]) -> None:
        width = max(len(s.prompt_ids) for s in batch)
        ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)  # (batch, width), left-padded
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, slot in enumerate(batch):
            ids[row, width - len(slot.prompt_ids):] = torch.tensor(slot.prompt_ids)
            mask[row, width - len(slot.prompt_ids):] = 1
        self.model.generate(ids, attention_mask=mask, max_new_tokens=max(s.max_new_tokens for s in batch),
                            do_sample=False, pad_token_id=self.pad_id, eos_token_id=sorted(self.eos_ids),
                            streamer=RowStreamer(batch, self.eos_ids, self.counters),
                            stopping_criteria=StoppingCriteriaList([RowLimits(width, batch)]))


class HfGateway(gateway_pb2_grpc.GatewayServicer):
    def __init__(self, batcher: StaticBatcher, default_max_new_tokens: int = 256) -> None:
        self.batcher, self.default_max_new_tokens = batcher, default_max_new_tokens

    def Generate(self, request, context):
        if request.WhichOneof("input") != "prompt_token_ids" or not request.prompt_token_ids.ids:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the hf-static peer takes prompt_token_ids only")
        arrived = time.monotonic()
        max_new = request.max_new_tokens if request.HasField("max_new_tokens") else self.default_max_new_tokens
        slot = self.batcher.submit(list(request.prompt_token_ids.ids), max_new)
        context.add_callback(lambda: setattr(slot, "cancelled", True))
        first_at, num = None, 0
        while True:
            try:
                token = slot.tokens.get(timeout=_POLL_S)
            except queue.Empty:
                if not context.is_active():
                    slot.cancelled = True
                    return
                continue
            if token is _DONE:
                break
            first_at, num = first_at or time.monotonic(), num + 1
            yield gateway_pb2.GenerateResponse(token_ids=[token], request_id=request.request_id)
        reason = common_pb2.FINISH_REASON_STOP if slot.finish_reason == "stop" else common_pb2.FINISH_REASON_LENGTH
        yield last_reply(request_id=request.request_id, finish_reason=reason, prompt_tokens=len(slot.prompt_ids),
                         completion_tokens=num, arrived=arrived, first_at=first_at)


class HfStats(decode_pb2_grpc.DecodeServicer):
    """Only Stats: the batch size now, and steps and tokens since start (tokens count padded rows too)."""

    def __init__(self, batcher: StaticBatcher) -> None:
        self.batcher = batcher

    def Stats(self, request, context):
        c = self.batcher.counters
        return decode_pb2.DecodeStats(num_running=self.batcher.running, num_steps=c["steps"],
                                      num_tokens_generated=c["tokens"], max_batch_size=c["batch_max"],
                                      mean_batch_size=c["tokens"] / c["steps"] if c["steps"] else 0.0)


def serve(model, eos_ids: frozenset[int], pad_id: int, host: str, port: int, max_batch_size: int):
    """Starts the server; returns (server, bound port)."""
    batcher = StaticBatcher(model, pad_id, eos_ids, max_batch_size)
    server = make_server(4 * 2**20)  # token-id requests
    health = add_health(server)
    gateway_pb2_grpc.add_GatewayServicer_to_server(HfGateway(batcher), server)
    decode_pb2_grpc.add_DecodeServicer_to_server(HfStats(batcher), server)
    bound = bind(server, host, port)
    server.start()
    set_serving(health, ["pdserve.v1.Gateway"])
    return server, bound


def load_model(model_dir):
    model = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    eos = model.generation_config.eos_token_id
    eos_ids = frozenset(eos if isinstance(eos, list) else [eos])
    return model, eos_ids, min(eos_ids)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pdserve.bench.hf_static", description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--max-batch-size", type=int, default=32)
    args = parser.parse_args(argv)
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    model, eos_ids, pad_id = load_model(args.model)
    server, port = serve(model, eos_ids, pad_id, args.host, args.port, args.max_batch_size)
    print(f"hf-static serving on port {port}", flush=True)
    wait_for_signal()
    server.stop(2.0).wait()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
