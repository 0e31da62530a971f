"""One `pdserve trilemma` invocation: the serving sweep, the offline measures, the report."""

import os
from pathlib import Path

from common.basics.config import default_certs_dir
from common.runtime.machine import machine_facts
from pdserve.bench.peer_process import PeerOptions
from pdserve.bench.runner import git_commit, machine_description
from pdserve.bench.workloads import WORKLOADS
from pdserve.trilemma import measures, report
from pdserve.trilemma.sweep import DEFAULT_SWEEP, SweepOptions, run_sweep


def execute(args) -> dict:
    out_dir: Path = args.out
    if args.workload not in WORKLOADS:
        raise SystemExit(f"pdserve trilemma: unknown workload {args.workload!r}; choose from {', '.join(WORKLOADS)}")
    options = SweepOptions(
        model_dir=args.model, out_dir=out_dir, workload=args.workload, num_requests=args.num_requests,
        concurrency=args.concurrency, num_fidelity_prompts=args.fidelity_prompts,
        fidelity_tokens=args.fidelity_tokens, max_duration_s=args.max_duration_s,
        peer=PeerOptions(model_dir=args.model, log_dir=out_dir / "logs", prefill_cpus=args.prefill_cpus,
                         certs_dir=default_certs_dir(os.environ.get("XDG_CACHE_HOME"), os.path.expanduser("~")),
                         decode_cpus=args.decode_cpus, fixed_k=args.fixed_k))
    rows = run_sweep(list(args.configs or DEFAULT_SWEEP), options)
    configs = [r.config for r in rows]
    weights = measures.weight_bytes(args.model, {c.prefill_weights for c in configs} | {c.decode_weights
                                                                                       for c in configs})
    kv = measures.kv_bytes(args.model, {c.kv_dtype for c in configs})
    forced = measures.teacher_forced(args.model, {(c.decode_weights, c.kv_dtype) for c in configs}) \
        if args.teacher_forced else {}
    for row in rows:
        c = row.config
        row.cost |= {"prefill_weight_bytes": weights[c.prefill_weights], "decode_weight_bytes": weights[c.decode_weights],
                     "kv_bytes_per_token": kv[c.kv_dtype]}
        if not row.error:
            row.fidelity |= forced.get((c.decode_weights, c.kv_dtype), {})
    summary = {"command": args.command_line, "git_commit": git_commit(), "machine": machine_description(),
               "machine_facts": machine_facts(),
               "load": f"{args.workload} workload, {args.num_requests} requests, closed loop with "
                       f"{args.concurrency} clients, greedy",
               "fidelity_prompts": f"{args.fidelity_prompts} open chat prompts, {args.fidelity_tokens} greedy tokens "
                                   "each, compared with the reference configuration's answers",
               "rows": [r.as_dict() for r in rows]}
    report.mark_pareto(summary["rows"])
    report.write(out_dir, summary)
    print(report.table(summary["rows"]))
    print(f"pdserve trilemma: wrote {out_dir}/trilemma.json, trilemma.md, trilemma.png")
    return summary
