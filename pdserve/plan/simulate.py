"""A discrete-time simulator of a pdserve stack: what TTFT and TPOT an arrival trace would see on a topology, from
a profile measured on a running stack (pdserve/plan/profile.py).

Disaggregated (P prefill, D decode instances): a request waits at the prefill instance with the least queued
work, which computes its prompt alone (prefill_ms of its tokens) and emits the first token; its KV lands after the
transfer tail, and it joins the decode instance running the fewest sequences at that instance's next step. A
decode instance runs steps back to back while it holds sequences (at most max_batch, the rest wait), each step
costing step_ms(batch, context tokens of the batch) and giving every running sequence one token.

Unified (one engine per instance, P = 0): every step runs the decode batch, then at most `chunk` prompt tokens of
the oldest waiting prompts (their marginal prefill cost): the long prompt's chunk lengthens every decoding
sequence's step, as pdserve-unified (and vLLM's chunked prefill) behaves.

Cores are shared: a tier's instances split its cores, and an instance busy alongside others on the same cores
runs slower in proportion (processor sharing: speed = min(1, cores / (busy instances x profiled cores per
instance)) x the profile's measured scaling for more cores than it was profiled on). Time advances in steps of
dt_ms. Only what the model says is simulated: no preemption, no prefix cache reuse, no network faults.
"""

import math
from collections import deque
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Profile:
    """Measured costs of one instance on `cores_per_instance` cores (pdserve/plan/profile.py)."""

    prefill_ms: tuple[float, float, float]  # a0 + a1 t + a2 t^2 for t uncached prompt tokens
    step_ms: tuple[float, float, float]  # b0 + b1 batch + b2 (context tokens summed over the batch)
    transfer_tail_ms: float  # KV transfer time left after prefill compute ends (median)
    overhead_ms: float  # TTFT beyond prefill and transfer at batch 1 (gateway, gRPC, tokenizer-free path)
    cores_per_instance: float = 1.0
    core_scaling: float = 1.0  # speed on twice the cores / speed on the profiled cores (1: no gain)
    machine: str = ""

    def prefill_cost(self, tokens: float) -> float:
        a0, a1, a2 = self.prefill_ms
        return max(a0 + a1 * tokens + a2 * tokens * tokens, 0.0)

    def chunk_cost(self, start: int, tokens: int) -> float:
        """A chunk of `tokens` after `start` already computed: the marginal cost (its attention reads the
        earlier ones), plus the fixed cost of a forward."""
        a0, a1, a2 = self.prefill_ms
        return max(a0 + a1 * tokens + a2 * ((start + tokens) ** 2 - start**2), 0.0)

    def step_cost(self, batch: int, context: int) -> float:
        b0, b1, b2 = self.step_ms
        return max(b0 + b1 * batch + b2 * context, 0.0) if batch else 0.0


@dataclass(frozen=True)
class Arrival:
    at_s: float
    prompt_tokens: int
    output_tokens: int


@dataclass(frozen=True)
class Topology:
    prefill: int  # prefill instances; 0: unified engines (each prefills its own prompts in chunks)
    decode: int  # decode instances (unified: engines)
    prefill_cores: float  # cores of the prefill tier, shared by its instances
    decode_cores: float  # cores of the decode tier (unified: of all engines)
    max_batch: int = 32
    chunk: int = 256  # unified: prompt tokens per step

    @property
    def label(self) -> str:
        if self.prefill == 0:
            return f"unified x{self.decode} ({self.decode_cores:g} cores)"
        return f"{self.prefill}P{self.decode}D ({self.prefill_cores:g}+{self.decode_cores:g} cores)"


@dataclass
class Outcome:
    arrival: Arrival
    first_s: float | None = None
    last_s: float | None = None
    tokens: int = 0

    @property
    def ttft_ms(self) -> float | None:
        return None if self.first_s is None else (self.first_s - self.arrival.at_s) * 1000

    @property
    def tpot_ms(self) -> float | None:
        if self.tokens < 2 or self.last_s is None:
            return None
        return (self.last_s - self.first_s) * 1000 / (self.tokens - 1)


@dataclass
class _Seq:
    index: int
    context: int
    left: int  # tokens still to generate
    prefilled: int = 0  # unified: prompt tokens computed so far


@dataclass
class _Instance:
    cores: float  # share of its tier's cores when all are busy is computed per tick; this is the tier's total
    queue: deque = field(default_factory=deque)  # prefill: request indices; decode: sequences waiting to join
    running: list = field(default_factory=list)  # decode: sequences in the batch
    work_ms: float = 0.0  # left in the current operation
    op: object = None  # prefill: the request index; decode: the batch of the step


def _speed(profile: Profile, cores: float, busy: int) -> float:
    share = cores / max(busy, 1) / profile.cores_per_instance
    if share <= 1:
        return share
    return 1 + (profile.core_scaling - 1) * min(math.log2(share), 1.0)


def simulate(profile: Profile, topology: Topology, arrivals: list[Arrival], dt_ms: float = 1.0,
             limit_s: float = 3600.0) -> list[Outcome]:
    """Each arrival's outcome (in order): first-token and last-token times, tokens generated."""
    outcomes = [Outcome(a) for a in arrivals]
    order = sorted(range(len(arrivals)), key=lambda i: arrivals[i].at_s)
    prefill = [_Instance(topology.prefill_cores) for _ in range(topology.prefill)]
    decode = [_Instance(topology.decode_cores) for _ in range(topology.decode)]
    landing: list[tuple[float, int]] = []  # (time the KV has landed, request) for the decode tier
    next_arrival, t, dt = 0, 0.0, dt_ms / 1000
    done = 0
    while done < len(arrivals) and t < limit_s:
        while next_arrival < len(order) and arrivals[order[next_arrival]].at_s <= t:
            i = order[next_arrival]
            if prefill:
                target = min(prefill, key=lambda p: p.work_ms + sum(profile.prefill_cost(arrivals[j].prompt_tokens)
                                                                    for j in p.queue))
                target.queue.append(i)
            else:
                target = min(decode, key=lambda d: len(d.running) + len(d.queue))
                target.queue.append(_Seq(i, arrivals[i].prompt_tokens, arrivals[i].output_tokens))
            next_arrival += 1
        for at, i in [x for x in landing if x[0] <= t]:
            landing.remove((at, i))
            target = min(decode, key=lambda d: len(d.running) + len(d.queue))
            seq = _Seq(i, arrivals[i].prompt_tokens + 1, arrivals[i].output_tokens - 1)
            if seq.left > 0:
                target.queue.append(seq)
            else:
                done += 1
        # prefill instances
        busy = sum(1 for p in prefill if p.op is not None or p.queue)
        for p in prefill:
            if p.op is None and p.queue:
                p.op = p.queue.popleft()
                p.work_ms = profile.prefill_cost(arrivals[p.op].prompt_tokens)
            if p.op is None:
                continue
            p.work_ms -= dt_ms * _speed(profile, p.cores, busy)
            if p.work_ms <= 0:
                i, p.op = p.op, None
                first = t + dt + (profile.transfer_tail_ms + profile.overhead_ms) / 1000  # streamed once KV landed
                outcomes[i].first_s = outcomes[i].last_s = first
                outcomes[i].tokens = 1
                landing.append((t + dt + profile.transfer_tail_ms / 1000, i))
        # decode instances (or unified engines)
        busy = sum(1 for d in decode if d.op is not None or d.running or d.queue)
        for d in decode:
            if d.op is None:
                _begin_step(d, profile, topology, outcomes)
            if d.op is None:
                continue
            d.work_ms -= dt_ms * _speed(profile, d.cores, busy)
            if d.work_ms <= 0:
                done += _end_step(d, t + dt, profile, outcomes)
        t += dt
    return outcomes


def _begin_step(d: _Instance, profile: Profile, topology: Topology, outcomes: list[Outcome]) -> None:
    unified = topology.prefill == 0
    if not unified:
        while d.queue and len(d.running) < topology.max_batch:
            d.running.append(d.queue.popleft())
    batch = list(d.running)
    work = profile.step_cost(len(batch), sum(s.context for s in batch))
    chunks = []
    if unified:
        left = topology.chunk
        for seq in list(d.queue):
            if left <= 0 or len(d.running) + len(chunks) >= topology.max_batch:
                break
            n = min(left, seq.context - seq.prefilled)
            work += profile.chunk_cost(seq.prefilled, n)
            chunks.append((seq, n))
            left -= n
    if batch or chunks:
        d.op, d.work_ms = (batch, chunks), work


def _end_step(d: _Instance, now: float, profile: Profile, outcomes: list[Outcome]) -> int:
    batch, chunks = d.op
    d.op = None
    finished = 0
    for seq in batch:
        seq.context += 1
        seq.left -= 1
        out = outcomes[seq.index]
        out.last_s, out.tokens = now, out.tokens + 1
        if seq.left <= 0:
            d.running.remove(seq)
            finished += 1
    for seq, n in chunks:
        seq.prefilled += n
        if seq.prefilled >= seq.context:  # the prompt is in: its first token comes with this step
            d.queue.remove(seq)
            out = outcomes[seq.index]
            out.first_s = out.last_s = now + profile.overhead_ms / 1000
            out.tokens = 1
            seq.left -= 1
            seq.context += 1
            if seq.left > 0:
                d.running.append(seq)
            else:
                finished += 1
    return finished


def percentile(values: list[float], p: float) -> float | None:
    """The p-th percentile (0-100) by linear interpolation between closest ranks (numpy's default)."""
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * p / 100
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def summarize(outcomes: list[Outcome]) -> dict:
    """TTFT and TPOT p50/p99 in ms, and how many requests finished within the simulated time."""
    ttft = [o.ttft_ms for o in outcomes if o.ttft_ms is not None]
    tpot = [o.tpot_ms for o in outcomes if o.tpot_ms is not None]
    return {"ttft_ms": {"p50": percentile(ttft, 50), "p99": percentile(ttft, 99)},
            "tpot_ms": {"p50": percentile(tpot, 50), "p99": percentile(tpot, 99)},
            "num_finished": sum(1 for o in outcomes if o.tokens >= o.arrival.output_tokens),
            "num_requests": len(outcomes)}
