"""Which CPU path a tier's matrix products take, chosen at start-up by measuring them on this CPU.

Each linear can get a second copy of its weight laid out for a faster CPU kernel (LlamaModel.add_blocked_copies):
oneDNN's blocked float32 for fp32 weights, FBGEMM's packed fp16 for fp16, oneDNN's blocked bf16 where the CPU has
bf16 dot-product units (AVX-512 BF16, AMX) for bf16. Whether the copy pays depends on the CPU, the weight format
and the rows a product has, so `--cpu-weight-layout auto` (the default) times one layer's projections and the LM
head plainly and through the copies, at the row counts the tier runs (decode: a few sequences per step; prefill:
prompt chunks), and keeps the copies only where they are faster; the choice and its figures are logged.
`dual` and `single` force it. A choice is kept per machine (CPU model, torch, threads, format, shapes) in
$XDG_CACHE_HOME/pdserve/cpu-paths.json, so only a machine's first start of each kind pays the second or two it
takes; delete the file to measure again. Every path keeps the format's own fidelity: the fp32 copy computes in fp32, the
fp16 one in fp32 from fp16 weights, the bf16 one as the bf16 format's products (tests/common/model).
"""

import json
import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from common.basics.config import cache_root
from common.model.llama import LlamaModel
from common.runtime.machine import machine_facts

log = logging.getLogger(__name__)

DECODE_ROWS = (1, 4, 16)  # sequences per decode step
PREFILL_ROWS = (128,)  # prompt tokens per prefill chunk (a few hundred run in chunks of this order)
_REPEATS = 3


@dataclass(frozen=True)
class LayoutChoice:
    layout: str  # "dual" (the copies kept) or "single"
    rows: tuple[int, ...]
    single_ms: tuple[float, ...]  # estimated products of one model step at each row count, plain
    dual_ms: tuple[float, ...]  # and through the copies

    def describe(self) -> str:
        figures = ", ".join(f"{rows} row(s) {s:.2f} ms plain vs {d:.2f} ms with the copies"
                            for rows, s, d in zip(self.rows, self.single_ms, self.dual_ms))
        return f"CPU weight layout {self.layout} (measured, a whole step's products: {figures})"


def _time_ms(linear, x: torch.Tensor) -> float:
    linear(x)  # first call: allocations, kernel selection
    best = float("inf")
    for _ in range(_REPEATS):
        start = time.perf_counter()
        linear(x)
        best = min(best, time.perf_counter() - start)
    return best * 1e3


def measure_layouts(model: LlamaModel, rows: tuple[int, ...]) -> LayoutChoice | None:
    """Times the LM head and layer 0's projections (scaled by the layer count) at each row count, with and
    without their copies; None, timing nothing, where no linear of this model gets a copy on this machine (other
    formats, or off CPU)."""
    sample = [model.lm_head, *model.linears()[1:][:len(model.linears()[1:]) // model.config.num_layers]]
    copied = [linear for linear in sample if linear.add_blocked_copy()]
    if not copied:
        return None
    weights = [1.0] + [float(model.config.num_layers)] * (len(sample) - 1)

    def step_ms() -> tuple[float, ...]:
        per_linear = [[_time_ms(linear, torch.randn(n, linear.in_features)) for n in rows] for linear in sample]
        return tuple(sum(w * times[i] for w, times in zip(weights, per_linear)) for i in range(len(rows)))

    dual = step_ms()
    for linear in copied:
        linear.drop_copy()
    single = step_ms()
    layout = "dual" if sum(dual) < sum(single) else "single"
    return LayoutChoice(layout, rows, single, dual)


def cache_path() -> Path:
    return cache_root(os.environ.get("XDG_CACHE_HOME"), os.path.expanduser("~")) / "cpu-paths.json"


def _key(model: LlamaModel, weights: str, rows: tuple[int, ...]) -> str:
    facts, c = machine_facts(), model.config
    shapes = f"{c.num_layers}x{c.hidden_size}x{c.intermediate_size}x{c.vocab_size}"
    return "|".join([facts["cpu"], ",".join(facts["cpu_flags"]), facts["torch"], str(torch.get_num_threads()),
                     weights, shapes, ",".join(map(str, rows))])


def choose_layout(model: LlamaModel, weights: str, rows: tuple[int, ...]) -> LayoutChoice | None:
    """measure_layouts, or the choice this machine measured before for the same kind of tier."""
    path, key = cache_path(), _key(model, weights, rows)
    try:
        known = json.loads(path.read_text())
    except (OSError, ValueError):
        known = {}
    if key in known:
        entry = known[key]
        return LayoutChoice(entry["layout"], tuple(entry["rows"]), tuple(entry["single_ms"]), tuple(entry["dual_ms"]))
    choice = measure_layouts(model, rows)
    if choice is not None:
        known[key] = asdict(choice)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            temporary = path.with_suffix(f".{os.getpid()}.tmp")
            temporary.write_text(json.dumps(known, indent=1))
            temporary.replace(path)  # atomic: tiers starting together never read half a file
        except OSError as error:
            log.warning("could not keep the CPU path choice in %s: %s", path, error)
    return choice
