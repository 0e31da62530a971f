"""The trilemma's table, Pareto front and plot.

A configuration is on the Pareto front when no other configuration is at least as good on every axis and
better on one. The axes: latency (TPOT p50, lower is better), cost (output tokens/s, higher; decode-tier
weight bytes plus KV bytes per token of context, lower) and fidelity (greedy answers equal to the
reference's up to the first difference, higher; teacher-forced top-1 agreement, higher).
"""

import json
from pathlib import Path

# (key path into a row, True where higher is better)
AXES = (
    (("latency", "tpot_ms", "p50"), False),
    (("cost", "output_tokens_per_s"), True),
    (("cost", "decode_weight_bytes"), False),
    (("cost", "kv_bytes_per_token"), False),
    (("fidelity", "greedy_prefix_match"), True),
    (("fidelity", "top1_agreement"), True),
)


def _value(row: dict, path: tuple[str, ...]) -> float | None:
    for key in path:
        row = row.get(key) if isinstance(row, dict) else None
    return row


def dominates(a: dict, b: dict) -> bool:
    """a is no worse than b on every axis both have, and strictly better on at least one."""
    better = False
    for path, higher in AXES:
        x, y = _value(a, path), _value(b, path)
        if x is None or y is None:
            continue
        if (x < y) if higher else (x > y):
            return False
        better |= (x > y) if higher else (x < y)
    return better


def mark_pareto(rows: list[dict]) -> None:
    """Sets row["pareto"] on every measured row (rows with an error are never on the front)."""
    measured = [r for r in rows if not r.get("error")]
    for row in rows:
        row["pareto"] = not row.get("error") and not any(dominates(o, row) for o in measured if o is not row)


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def table(rows: list[dict]) -> str:
    head = ["configuration", "TTFT p50 ms", "TPOT p50 ms", "TPOT p99 ms", "out tok/s", "decode weights MiB",
            "prefill weights MiB", "KV B/token", "greedy match", "identical", "top-1 agree", "mean KL", "Δppl",
            "Pareto"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r in rows:
        if r.get("error"):
            lines.append(f"| {r['label']} | failed: {r['error'][:120]} |" + " |" * (len(head) - 2))
            continue
        lat, cost, fid = r["latency"], r["cost"], r["fidelity"]
        cells = [r["label"], _fmt(lat["ttft_ms"]["p50"], ".0f"), _fmt(lat["tpot_ms"]["p50"], ".1f"),
                 _fmt(lat["tpot_ms"]["p99"], ".1f"), _fmt(cost["output_tokens_per_s"], ".1f"),
                 _fmt(cost.get("decode_weight_bytes", 0) / 2**20, ".1f"),
                 _fmt(cost.get("prefill_weight_bytes", 0) / 2**20, ".1f"), _fmt(cost.get("kv_bytes_per_token"), "d"),
                 _fmt(fid.get("greedy_prefix_match"), ".1%"), _fmt(fid.get("greedy_identical"), ".0%"),
                 _fmt(fid.get("top1_agreement"), ".1%"), _fmt(fid.get("mean_kl"), ".4f"),
                 _fmt(fid.get("ppl_increase"), "+.2%"), "**yes**" if r["pareto"] else ""]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(path: Path, rows: list[dict]) -> None:
    """Output tokens/s against greedy match, marker area by decode-tier bytes, Pareto front ringed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    measured = [r for r in rows if not r.get("error")]
    fig, ax = plt.subplots(figsize=(9, 6))
    biggest = max((r["cost"].get("decode_weight_bytes", 1) for r in measured), default=1)
    for r in measured:
        x, y = r["cost"]["output_tokens_per_s"], r["fidelity"].get("greedy_prefix_match") or 0.0
        size = 60 + 400 * r["cost"].get("decode_weight_bytes", 0) / biggest
        ax.scatter([x], [y], s=size, alpha=0.6, color="tab:red" if r["pareto"] else "tab:gray")
        if r["pareto"]:
            ax.scatter([x], [y], s=size * 1.8, facecolors="none", edgecolors="tab:red")
        ax.annotate(f"{r['label']}\nTPOT p50 {r['latency']['tpot_ms']['p50']} ms", (x, y), fontsize=7,
                    xytext=(6, 4), textcoords="offset points")
    ax.set_xlabel("output tokens/s (higher is cheaper)")
    ax.set_ylabel("greedy answers equal to the fp32 reference, up to the first difference")
    ax.set_title("Latency, cost, fidelity (red, ringed: Pareto front; area: decode-tier weight bytes)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(out_dir: Path, summary: dict) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "trilemma.json").write_text(json.dumps(summary, indent=2) + "\n")
    text = (f"# pdserve trilemma\n\n`{summary['command']}`\n\nMachine: {summary['machine']}\n\n"
            f"Load: {summary['load']}. Fidelity prompts: {summary['fidelity_prompts']}.\n\n"
            f"{table(summary['rows'])}\n")
    (out_dir / "trilemma.md").write_text(text)
    plot(out_dir / "trilemma.png", summary["rows"])
