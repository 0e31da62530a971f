"""`pdserve trilemma`: latency, cost and fidelity of serving configurations, measured side by side.

A configuration is the weights of each tier, the KV-cache dtype and the speculation method. For each one the
sweep starts the real disaggregated stack (`pdserve up` with those flags), then measures:

  latency   TTFT and TPOT (p50, p99) under a closed-loop load of a named bench workload;
  cost      output tokens/s under that load; weight bytes of each tier; KV bytes per token;
  fidelity  against the first configuration (the reference, all fp32): greedy answers to fixed chat prompts
            through the running stack (tokens equal to the reference's, up to the first difference), and
            teacher-forced top-1 agreement, KL and perplexity change of the decode tier's weights and KV dtype
            from the fidelity harness (`pdserve eval`'s perplexity texts). A speculating configuration also
            counts the drafts it proposed and accepted in those greedy answers: what the comparison covered.

Every configuration runs the same requests, one after another, on the same cores.
"""

import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import grpc

from common.basics.config import KV_DTYPES, SPECULATIVE_METHODS, WEIGHT_FORMAT_NAMES
from pdserve.bench.loadgen import LoadSpec, run_load
from pdserve.bench.metrics import Slo, summarize
from pdserve.bench.peer_process import PeerOptions, RunningPeer
from pdserve.bench.peers import start_stack
from pdserve.bench.texts import OPEN_CHAT_PROMPTS
from pdserve.bench.workloads import WORKLOADS, make_requests
from pdserve.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc

_KEYS = {"prefill": "prefill_weights", "decode": "decode_weights", "kv": "kv_dtype", "spec": "speculative"}


@dataclass(frozen=True)
class ServeConfig:
    prefill_weights: str = "fp32"
    decode_weights: str = "fp32"
    kv_dtype: str = "float32"
    speculative: str = "none"

    def __post_init__(self) -> None:
        for name, value, allowed in (("prefill", self.prefill_weights, WEIGHT_FORMAT_NAMES),
                                     ("decode", self.decode_weights, WEIGHT_FORMAT_NAMES),
                                     ("kv", self.kv_dtype, KV_DTYPES), ("spec", self.speculative, SPECULATIVE_METHODS)):
            if value not in allowed:
                raise ValueError(f"{name}={value!r} is not one of {', '.join(allowed)}")

    @classmethod
    def parse(cls, text: str) -> "ServeConfig":
        """'prefill=fp32,decode=int4-awq-g128,kv=int8,spec=prompt-lookup'; omitted keys keep the default."""
        values = {}
        for part in filter(None, (p.strip() for p in text.split(","))):
            key, _, value = part.partition("=")
            if key not in _KEYS or not value:
                raise ValueError(f"expected key=value with key one of {', '.join(_KEYS)}, got {part!r}")
            values[_KEYS[key]] = value
        return cls(**values)

    @property
    def label(self) -> str:
        return (f"P {self.prefill_weights} / D {self.decode_weights} / KV {self.kv_dtype}"
                + ("" if self.speculative == "none" else f" / spec {self.speculative}"))

    def flags(self, fixed_k: bool = False) -> tuple[str, ...]:
        """`pdserve up` flags; with fixed_k a speculating configuration always proposes its k
        (--speculative-fixed-k), whatever the decode tier measured its verify steps to cost."""
        fixed = ("--speculative-fixed-k",) if fixed_k and self.speculative != "none" else ()
        return ("--prefill-weights", self.prefill_weights, "--decode-weights", self.decode_weights,
                "--kv-dtype", self.kv_dtype, "--speculative", self.speculative, *fixed)


REFERENCE = ServeConfig()

# The default sweep: the reference, then each lever alone, then combinations a deployment would pick.
DEFAULT_SWEEP = (
    REFERENCE,
    ServeConfig(speculative="prompt-lookup"),
    ServeConfig(decode_weights="int8"),
    ServeConfig(decode_weights="int4-awq-g128"),
    ServeConfig(decode_weights="fp8-e4m3"),
    ServeConfig(kv_dtype="int8"),
    ServeConfig(kv_dtype="fp8"),
    ServeConfig(decode_weights="int8", kv_dtype="int8", speculative="prompt-lookup"),
    ServeConfig(prefill_weights="int8", decode_weights="int8", kv_dtype="int8"),
)


@dataclass
class SweepOptions:
    model_dir: Path
    out_dir: Path
    workload: str = "chat"
    num_requests: int = 16
    concurrency: int = 4
    num_fidelity_prompts: int = 8
    fidelity_tokens: int = 48
    max_duration_s: float = 300.0
    seed: int = 0
    peer: PeerOptions | None = None


@dataclass
class ConfigRow:
    config: ServeConfig
    latency: dict = field(default_factory=dict)  # ttft_ms / tpot_ms: {p50, p99}
    cost: dict = field(default_factory=dict)  # output_tokens_per_s, weight bytes per tier, kv_bytes_per_token
    fidelity: dict = field(default_factory=dict)  # greedy_match, teacher-forced measures
    speculation: dict = field(default_factory=dict)  # drafts proposed / accepted in the greedy answers
    greedy_ids: list[list[int]] = field(default_factory=list)
    error: str = ""

    def as_dict(self) -> dict:
        out = {"label": self.config.label, **asdict(self.config), "latency": self.latency, "cost": self.cost,
               "fidelity": self.fidelity}
        out |= {"speculation": self.speculation} if self.config.speculative != "none" else {}
        return out | ({"error": self.error} if self.error else {})


def greedy_answers(address: str, prompts: list[str], max_new_tokens: int) -> tuple[list[list[int]], dict]:
    """Token ids of greedy answers to each prompt (one user chat turn), sent one after another; and the draft
    tokens proposed and accepted over all of them (zero without speculation)."""
    answers, proposed, accepted = [], 0, 0
    with grpc.insecure_channel(address) as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)
        for index, prompt in enumerate(prompts):
            request = gateway_pb2.GenerateRequest(max_new_tokens=max_new_tokens, request_id=f"trilemma-{index}",
                                                  sampling=common_pb2.SamplingParams(temperature=0.0))
            request.messages.messages.add(role="user", content=prompt)
            replies = list(stub.Generate(request, timeout=120))
            answers.append([t for reply in replies for t in reply.token_ids])
            if replies and replies[-1].HasField("speculation"):  # set on the last reply when it speculated
                proposed += replies[-1].speculation.num_proposed
                accepted += replies[-1].speculation.num_accepted
    return answers, {"num_proposed": proposed, "num_accepted": accepted}


def greedy_match(answers: list[list[int]], reference: list[list[int]]) -> dict:
    """Per prompt, the share of the reference answer reproduced before the first differing token; the share
    of answers identical to the reference; and how many tokens the answers hold (none: nothing compared)."""
    shares, identical = [], 0
    for ours, ref in zip(answers, reference):
        same = next((i for i, (a, b) in enumerate(zip(ours, ref)) if a != b), min(len(ours), len(ref)))
        shares.append(same / len(ref) if ref else 1.0)
        identical += ours == ref
    return {"greedy_prefix_match": round(sum(shares) / len(shares), 4) if shares else None,
            "greedy_identical": round(identical / len(answers), 4) if answers else None,
            "greedy_tokens": sum(len(ours) for ours in answers)}


def measure_serving(config: ServeConfig, options: SweepOptions, reference: ConfigRow | None) -> ConfigRow:
    """Starts the stack with config's flags, loads it, asks the fidelity prompts, stops it."""
    row = ConfigRow(config)
    peer_options = options.peer or PeerOptions(model_dir=options.model_dir, log_dir=options.out_dir / "logs")
    name = "trilemma-" + "-".join(v for v in asdict(config).values())
    try:
        peer: RunningPeer = start_stack(name, peer_options, colocated=False,
                                        extra=config.flags(fixed_k=peer_options.fixed_k))
    except RuntimeError as error:
        row.error = str(error)
        return row
    try:
        requests = make_requests(WORKLOADS[options.workload], options.num_requests, options.seed)
        run_load(peer.gateway_address, requests[:2], LoadSpec("closed", 2, options.max_duration_s))  # warm-up
        load = LoadSpec("closed", options.concurrency, options.max_duration_s, options.seed)
        results, duration_s = run_load(peer.gateway_address, requests, load)
        summary = summarize(results, duration_s, Slo(float("inf"), float("inf")))
        row.latency = {"ttft_ms": _p50_p99(summary["ttft_ms"]), "tpot_ms": _p50_p99(summary["tpot_ms"])}
        row.cost = {"output_tokens_per_s": summary["output_tokens_per_s"], "num_failed": summary["num_failed"]}
        prompts = list(OPEN_CHAT_PROMPTS[:options.num_fidelity_prompts])
        row.greedy_ids, row.speculation = greedy_answers(peer.gateway_address, prompts, options.fidelity_tokens)
        row.fidelity = greedy_match(row.greedy_ids, reference.greedy_ids if reference else row.greedy_ids)
    except grpc.RpcError as error:
        row.error = f"{error.code().name}: {error.details()}"
    finally:
        peer.stop()
    return row


def _p50_p99(block: dict) -> dict:
    return {"p50": block.get("p50"), "p99": block.get("p99")}


def run_sweep(configs: list[ServeConfig], options: SweepOptions) -> list[ConfigRow]:
    """The reference first (added when missing), then each configuration."""
    configs = [REFERENCE, *[c for c in configs if c != REFERENCE]]
    rows: list[ConfigRow] = []
    for config in configs:
        started = time.monotonic()
        rows.append(measure_serving(config, options, rows[0] if rows else None))
        print(f"pdserve trilemma: {config.label}: {time.monotonic() - started:.0f} s"
              + (f", failed: {rows[-1].error}" if rows[-1].error else ""), file=sys.stderr, flush=True)
    return rows
