"""Calibration for the int4 quantisers that need activations (AWQ, GPTQ): the calibration texts, and one
batched prefill of the unquantised model through which stand-in linears see the inputs of the real ones.

    found = {}
    model = calibration_model(config, weights)
    model.layers[i] = dataclasses.replace(layer, qkv=Watcher(layer.qkv, ...))   # sees its input x
    run_prefill(model, calibration_token_ids(model_dir))

GPTQ also calibrates on calibration_generated.txt: 32 texts the default model wrote itself, sampled at
temperature 1 from short openings (prose, code, French, Spanish, German, SQL, ...; `python -m
common.model.calibration` writes them again), cut into 40 sequences of 128 tokens. GPTQ fits each layer to its
calibration inputs in up to 1,536 dimensions, so 512 tokens of hand-written text let it overfit them; the
model's own distribution is the data-free calibration set of LLM-QAT and friends, and measured better than
adding Python's documentation (docs/fidelity.md). AWQ's scale search measured better on the hand-written text
alone. A checkpoint records a digest of the data it was calibrated on (calibration_digest) and is rebuilt
when that changes.

Mixture-of-experts models are refused: each expert sees only the tokens routed to it, so calibration would
need per-expert activations (and AWQ's folding into a shared norm no longer fits).
"""

import hashlib
import json
from pathlib import Path

import torch

from common.basics.model_config import ModelConfig
from common.kv.pool import KvPool
from common.model.linear import WeightFormat
from common.model.llama import LlamaModel
from common.model.runner import ModelRunner, PrefillChunk

CALIBRATION_FILE = Path(__file__).with_name("calibration.txt")
GENERATED_FILE = Path(__file__).with_name("calibration_generated.txt")
CALIBRATION_TOKENS = 512
GENERATED_SEQUENCES = 40  # every whole 128-token sequence of the file
SEQUENCE_TOKENS = 128
BLOCK_SIZE = 16
OPENINGS = ("The", "In 1998,", "def main():", "Dear Sir,", "The recipe", "Scientists have", "Chapter 1",
            "Once upon a time", "The city council", "To install", "Q:", "My favourite", "The weather",
            "In mathematics,", "The history of", "Yesterday", "La ville", "El libro", "Die Stadt", "import numpy",
            "The company", "When I was", "The following", "Abstract:", "The patient", "According to", "SELECT",
            "The game", "Music is", "The river", "Our team", "Water is")
GENERATED_TOKENS = 160


def calibration_token_ids(model_dir: Path, generated: bool = False) -> list[list[int]]:
    """The calibration texts (paragraphs of calibration.txt), tokenised and cut into sequences; with
    `generated`, the model-written texts' sequences after them."""
    ids = _paragraph_ids(model_dir, CALIBRATION_FILE)[:CALIBRATION_TOKENS]
    sequences = _cut(ids)
    if generated:
        sequences += [s for s in _cut(_paragraph_ids(model_dir, GENERATED_FILE)) if len(s) == SEQUENCE_TOKENS][
            :GENERATED_SEQUENCES]
    return sequences


def calibration_digest(method: str) -> str:
    """sha256 of the data a method calibrates on and how much of it (checkpoints record it)."""
    digest = hashlib.sha256(CALIBRATION_FILE.read_bytes())
    digest.update(f"{CALIBRATION_TOKENS}/{SEQUENCE_TOKENS}".encode())
    if method == "gptq":
        digest.update(GENERATED_FILE.read_bytes())
        digest.update(f"/{GENERATED_SEQUENCES}".encode())
    return digest.hexdigest()[:16]


def _paragraph_ids(model_dir: Path, path: Path) -> list[int]:
    from common.basics.tokenizer import TextTokenizer

    tokenizer = TextTokenizer(model_dir)
    ids: list[int] = []
    for paragraph in path.read_text().split("\n\n"):
        ids += tokenizer.encode(paragraph.strip() + "\n")
    return ids


def _cut(ids: list[int]) -> list[list[int]]:
    return [ids[i:i + SEQUENCE_TOKENS] for i in range(0, len(ids), SEQUENCE_TOKENS)]


def check_supported(config: ModelConfig, fmt: WeightFormat) -> None:
    if config.is_moe:
        raise ValueError(f"weight format {fmt.name!r}: calibrated quantisation ({fmt.method}) is not supported "
                         f"for mixture-of-experts models; use int4-g{fmt.group_size} (round-to-nearest int4, "
                         "quantised per expert)")


def fused_projections(config: ModelConfig) -> dict[str, list[tuple[str, slice]]]:
    """Each calibrated linear of a layer -> the checkpoint projections its rows are, with their rows: q/k/v and
    gate/up are one linear each in the model, and a quantiser's result is split back by these."""
    q, kv = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
    hidden, inner = config.hidden_size, config.intermediate_size
    return {"qkv": [("self_attn.q_proj", slice(0, q)), ("self_attn.k_proj", slice(q, q + kv)),
                    ("self_attn.v_proj", slice(q + kv, q + 2 * kv))],
            "out": [("self_attn.o_proj", slice(0, hidden))],
            "gate_up": [("mlp.gate_proj", slice(0, inner)), ("mlp.up_proj", slice(inner, 2 * inner))],
            "down": [("mlp.down_proj", slice(0, hidden))]}


def calibration_model(config: ModelConfig, weights: dict[str, torch.Tensor]) -> LlamaModel:
    return LlamaModel(config, weights, torch.float32, "cpu", weight_format="fp32")


def run_prefill(model: LlamaModel, calibration: list[list[int]]) -> None:
    """One batched prefill of every calibration sequence (the layers' stand-ins record what they see)."""
    c = model.config
    num_blocks = sum(-(-len(ids) // BLOCK_SIZE) for ids in calibration)
    kv = KvPool(num_layers=c.num_layers, num_blocks=num_blocks, block_size=BLOCK_SIZE,
                num_kv_heads=c.num_kv_heads, head_dim=c.head_dim, dtype=torch.float32)
    chunks, next_block = [], 0
    for ids in calibration:
        count = -(-len(ids) // BLOCK_SIZE)
        chunks.append(PrefillChunk(ids, 0, list(range(next_block, next_block + count))))
        next_block += count
    ModelRunner(model, kv).run_prefill(chunks)


@torch.inference_mode()
def generate_texts(model_dir: Path, seed: int = 0) -> list[str]:
    """What calibration_generated.txt holds: GENERATED_TOKENS tokens sampled at temperature 1 from the fp32
    model after each opening, all openings decoded as one batch."""
    from common.basics.tokenizer import TextTokenizer
    from common.model.runner import DecodeItem
    from common.model.weights import prepare_weights

    config, tokenizer = ModelConfig.from_dir(model_dir), TextTokenizer(model_dir)
    model = calibration_model(config, prepare_weights(model_dir, "fp32"))
    per_sequence = (GENERATED_TOKENS + 40) // BLOCK_SIZE + 1
    kv = KvPool(num_layers=config.num_layers, num_blocks=len(OPENINGS) * per_sequence, block_size=BLOCK_SIZE,
                num_kv_heads=config.num_kv_heads, head_dim=config.head_dim, dtype=torch.float32)
    tables = [list(range(i * per_sequence, (i + 1) * per_sequence)) for i in range(len(OPENINGS))]
    bos = json.loads((model_dir / "config.json").read_text())["bos_token_id"]
    outputs = [[bos, *tokenizer.encode(opening)] for opening in OPENINGS]
    runner, generator = ModelRunner(model, kv), torch.Generator().manual_seed(seed)
    logits = runner.run_prefill([PrefillChunk(ids, 0, table) for ids, table in zip(outputs, tables)])
    for _ in range(GENERATED_TOKENS):
        tokens = torch.multinomial(torch.softmax(logits.float(), -1), 1, generator=generator)[:, 0].tolist()
        for out, token in zip(outputs, tokens):
            out.append(token)
        logits = runner.run_decode([DecodeItem(out[-1], len(out) - 1, table) for out, table in zip(outputs, tables)])
    return [tokenizer.decode(out[1:]).replace("\n\n", "\n").strip() for out in outputs]


if __name__ == "__main__":
    import os

    from common.basics.config import default_model_dir

    torch.set_num_threads(1)
    model = default_model_dir(os.environ.get("XDG_CACHE_HOME"), os.path.expanduser("~"))
    GENERATED_FILE.write_text("\n\n".join(generate_texts(model)) + "\n")
