"""Figures of the benchmark reports: latency against arrival rate per policy
with the SLO line, the JCT CDF, and how many jobs sat in each MLFQ level over
one run. matplotlib is an optional extra (`pip install 'fastserve[plot]'`):
without it `pyplot()` raises PlotUnavailable, whose message says so."""
from __future__ import annotations

import numpy as np

INSTALL = "pip install 'fastserve[plot]'"


class PlotUnavailable(RuntimeError):
    pass


def pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise PlotUnavailable(f"plots need matplotlib, which is not installed: {INSTALL}") from exc
    return plt


def plot(out: str, curves: dict[str, list[tuple[float, float]]], jcts: dict[str, list[float]], slo: float,
         title: str) -> None:
    """Mean normalized latency against rate, and the JCT CDF (`fastserve sim --plot`)."""
    plt = pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    _against_rate(ax1, curves, "mean normalized latency (s/token)", slo)
    for name, v in jcts.items():
        a = np.sort(np.array(v))
        ax2.plot(a, np.arange(1, len(a) + 1) / len(a), label=name)
    ax2.set_xlabel("JCT (s)")
    ax2.set_ylabel("CDF")
    ax2.set_xscale("log")
    ax2.legend()
    _save(fig, plt, out, title)


def plot_rates(out: str, norm: dict[str, list[tuple[float, float]]], ttft: dict[str, list[tuple[float, float]]],
               slo: float | None, title: str) -> None:
    """Normalized latency (with the SLO line) and TTFT against the arrival rate, one curve per policy."""
    plt = pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    _against_rate(ax1, norm, "mean normalized latency (s/token)", slo)
    _against_rate(ax2, ttft, "mean TTFT (s)", None)
    _save(fig, plt, out, title)


def plot_occupancy(out: str, times: list[float], queue_lengths: list[list[int]], title: str) -> None:
    """Jobs in each MLFQ level over one run, stacked (Q0 at the bottom)."""
    plt = pyplot()
    levels = max((len(q) for q in queue_lengths), default=0)
    used = [i for i in range(levels) if any(len(q) > i and q[i] for q in queue_lengths)]
    fig, ax = plt.subplots(figsize=(11, 4))
    if used:
        series = [[q[i] if len(q) > i else 0 for q in queue_lengths] for i in used]
        ax.stackplot(times, series, labels=[f"Q{i}" for i in used], step="post")
        ax.legend(loc="upper left", ncol=min(len(used), 6))
    ax.set_xlabel("time (s)")
    ax.set_ylabel("jobs in the scheduler")
    _save(fig, plt, out, title)


def _against_rate(ax, curves: dict[str, list[tuple[float, float]]], ylabel: str, slo: float | None) -> None:
    for name, pts in curves.items():
        if pts:
            xs, ys = zip(*sorted(pts))
            ax.plot(xs, ys, marker="o", label=name)
    if slo:
        ax.axhline(slo, color="gray", linestyle="--", label=f"SLO {slo:.3f} s/token")
    ax.set_xlabel("arrival rate (req/s)")
    ax.set_ylabel(ylabel)
    ax.set_yscale("log")
    ax.legend()


def _save(fig, plt, out: str, title: str) -> None:
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def plot_sweep(out: str, title: str, rates: list[float], series: dict[str, tuple[list[float], list[float]]],
               bound: list[float], slo: float) -> None:
    """Mean and P95 normalized latency against rate, one line per policy
    (`series`: policy -> (means, p95s) at `rates`); the lower bound on the mean."""
    plt = pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4), sharex=True)
    for name, (means, p95s) in series.items():
        ax1.plot(rates, means, marker="o", label=name)
        ax2.plot(rates, p95s, marker="o", label=name)
    ax1.plot(rates, bound, color="black", linestyle=":", label="lower bound")
    for ax, what in ((ax1, "mean"), (ax2, "P95")):
        ax.axhline(slo, color="gray", linestyle="--", label=f"SLO {slo:.3f} s/token")
        ax.set_xlabel("arrival rate (req/s)")
        ax.set_ylabel(f"{what} normalized latency (s/token)")
        ax.set_yscale("log")
        ax.legend(fontsize=8)
    _save(fig, plt, out, title)

