"""The prefill engine alone (real weights, no servers): chunked prefill hands every layer's KV to the sender
in token order, exactly as a one-shot prefill stores it, and draws the same first token; prompts waiting
together share a step; cancelled and oversized prompts give everything back."""

import threading

import pytest
import torch
from bounds import decoder_tolerance
from in_process_tiers import prefill_engine, runner_over

from common.basics.errors import ResourceExhausted
from common.basics.sampling import SamplingConfig
from common.kv.transport import InProcessKvSender, SenderState
from common.model.llama import LlamaModel
from common.model.runner import PrefillChunk
from prefill_svc.engine import PrefillJob

CHUNK = 32


class RecordingReceiver:
    """A KvReceiver that keeps every layer's rows in arrival order."""

    def __init__(self, num_layers: int, num_tokens: int) -> None:
        self.rows: dict[int, list[tuple[int, torch.Tensor, torch.Tensor]]] = {i: [] for i in range(num_layers)}
        self.num_tokens = num_tokens
        self.lock = threading.Lock()

    def receive_kv(self, handle: str, layer: int, start: int, rows) -> None:
        with self.lock:
            self.rows[layer].append((start, rows.key.clone(), rows.value.clone()))

    def transfer_complete(self, handle: str) -> bool:
        return all(sum(k.shape[0] for _, k, _ in rows) == self.num_tokens for rows in self.rows.values())


@pytest.fixture(scope="module")
def model(model_dir):
    return LlamaModel.load(model_dir)


def _job(prompt_ids: list[int], receiver) -> PrefillJob:
    return PrefillJob("r", prompt_ids, SamplingConfig(), InProcessKvSender(receiver, "h"))


def test_chunked_prefill_sends_every_layer_in_order_as_a_one_shot_prefill_stores_it(model, tokenizer):
    prompt = tokenizer.encode("Chunked prefill splits a long prompt into pieces. " * 6)  # 3 chunks of 32
    receiver = RecordingReceiver(model.config.num_layers, len(prompt))
    engine = prefill_engine(model, chunk_size=CHUNK)
    job = engine.submit(_job(prompt, receiver))
    engine.start()
    try:
        assert job.done.wait(120)
    finally:
        engine.stop()
    ack = job.sender.wait()
    assert job.num_chunks == -(-len(prompt) // CHUNK) == 3 and ack.num_chunks == 3 * model.config.num_layers
    runner, blocks = runner_over(model, 16)
    table = blocks.allocate(len(prompt))
    logits = runner.run_prefill([PrefillChunk(prompt, 0, table)])[0]
    top2 = logits.topk(2).values
    assert top2[0] - top2[1] > 2 * decoder_tolerance(model.config, logits)  # a choice float32 noise cannot flip
    assert job.first_token == int(logits.argmax())
    for layer, rows in receiver.rows.items():
        assert [start for start, _, _ in rows] == [0, CHUNK, 2 * CHUNK]  # token order
        key = torch.cat([k for _, k, _ in rows])  # (tokens, kv_heads, head_dim)
        expected, _ = runner.kv.read_slots(layer, runner.kv.slots(table, 0, len(prompt)))
        # K of a layer is a product over the residual stream: the decoder's float32 bound applies
        assert (key - expected).abs().max() <= decoder_tolerance(model.config, expected)
    assert engine.blocks.num_free == engine.blocks.num_blocks


def test_prompts_waiting_together_share_a_step(model, tokenizer):
    engine = prefill_engine(model, chunk_size=CHUNK)
    prompts = [tokenizer.encode(t) for t in ("Hello there", "A second prompt", "And a third")]
    jobs = [engine.submit(_job(p, RecordingReceiver(model.config.num_layers, len(p)))) for p in prompts]
    engine.start()  # all three are queued before the first step
    try:
        assert all(job.done.wait(120) for job in jobs)
    finally:
        engine.stop()
    stats = engine.stats()
    assert stats.num_steps == 1 and stats.max_batch_prompts == 3 and stats.num_prompts == 3


def test_a_cancelled_prompt_aborts_its_transfer_and_frees_its_blocks(model, tokenizer):
    engine = prefill_engine(model, chunk_size=CHUNK)
    prompt = tokenizer.encode("Never computed")
    job = engine.submit(_job(prompt, RecordingReceiver(model.config.num_layers, len(prompt))))
    engine.cancel(job)  # before the engine ever steps
    engine.start()
    try:
        assert job.done.wait(60)
    finally:
        engine.stop()
    assert job.cancelled and job.sender.state is SenderState.ABORTED and job.first_token is None
    assert engine.blocks.num_free == engine.blocks.num_blocks and engine.stats().num_queued == 0


def test_a_prompt_larger_than_the_pool_is_refused_at_once(model):
    engine = prefill_engine(model, num_blocks=2)
    with pytest.raises(ResourceExhausted, match="does not fit"):
        engine.submit(_job(list(range(100, 140)), RecordingReceiver(model.config.num_layers, 40)))
