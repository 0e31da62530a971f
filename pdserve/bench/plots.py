"""PNG plots of a bench invocation: latency CDFs, throughput and goodput against the request rate, and
the decode batch size over time. matplotlib with the Agg backend (no display)."""

from pathlib import Path

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _legend(ax, fontsize: int) -> None:
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=fontsize)
    else:
        ax.text(0.5, 0.5, "no data for this plot", ha="center", va="center", transform=ax.transAxes)


def latency_cdfs(path: Path, series: list[tuple[str, dict[str, list[float]]]]) -> Path:
    """series: (label, {"TTFT": [ms...], "TPOT": [...], "e2e": [...]}) per run."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    for ax, metric in zip(axes, ("TTFT", "TPOT", "e2e")):
        for label, values in series:
            data = np.sort(np.asarray(values.get(metric, []), dtype=float))
            if data.size:
                ax.step(data, np.arange(1, data.size + 1) / data.size, where="post", label=label)
        ax.set_xscale("log")
        ax.set_xlabel(f"{metric} (ms, log scale)")
        ax.set_ylabel("fraction of requests")
        ax.grid(True, alpha=0.3)
    _legend(axes[0], 7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def throughput_vs_rate(path: Path, runs: list[dict]) -> Path:
    """Output tokens/s and goodput against the offered rate, one line per peer (open-loop runs)."""
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5))
    for name in dict.fromkeys(r["name"] for r in runs):
        mine = sorted((r for r in runs if r["name"] == name and r.get("rate_rps")), key=lambda r: r["rate_rps"])
        if mine:
            rates = [r["rate_rps"] for r in mine]
            left.plot(rates, [r["output_tokens_per_s"] for r in mine], marker="o", label=name)
            right.plot(rates, [r["goodput_rps"] for r in mine], marker="o", label=name)
    left.set(xlabel="offered rate (requests/s)", ylabel="output tokens/s", title="throughput")
    right.set(xlabel="offered rate (requests/s)", ylabel="requests/s meeting TTFT and TPOT", title="goodput")
    for ax in (left, right):
        ax.grid(True, alpha=0.3)
        _legend(ax, 8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def decode_batch(path: Path, runs: list[dict]) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(10, 4))
    for run in runs:
        samples = (run.get("decode_batch") or {}).get("samples") or []
        if samples:
            ax.plot([s[0] for s in samples], [s[1] for s in samples],
                    label=f"{run['name']} ({run['workload']}, {run['load']})")
    ax.set(xlabel="seconds into the run", ylabel="sequences in the decode batch", title="decode batch size")
    ax.grid(True, alpha=0.3)
    _legend(ax, 7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
