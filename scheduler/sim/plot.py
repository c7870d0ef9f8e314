"""Figures the paper draws: normalized latency against rate per policy, and
the JCT CDF. matplotlib is an optional extra (`pip install fastserve[plot]`)."""
from __future__ import annotations

import numpy as np


def plot(out: str, curves: dict[str, list[tuple[float, float]]], jcts: dict[str, list[float]], slo: float,
         title: str) -> None:
    plt = _pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for name, pts in curves.items():
        xs, ys = zip(*sorted(pts))
        ax1.plot(xs, ys, marker="o", label=name)
    ax1.axhline(slo, color="gray", linestyle="--", label=f"SLO {slo:.3f} s/token")
    ax1.set_xlabel("arrival rate (req/s)")
    ax1.set_ylabel("mean normalized latency (s/token)")
    ax1.set_yscale("log")
    ax1.legend()
    for name, v in jcts.items():
        a = np.sort(np.array(v))
        ax2.plot(a, np.arange(1, len(a) + 1) / len(a), label=name)
    ax2.set_xlabel("JCT (s)")
    ax2.set_ylabel("CDF")
    ax2.set_xscale("log")
    ax2.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def plot_sweep(out: str, title: str, rates: list[float], series: dict[str, tuple[list[float], list[float]]],
               bound: list[float], slo: float) -> None:
    """Mean and P95 normalized latency against rate, one line per policy
    (`series`: policy -> (means, p95s) at `rates`); the lower bound on the mean."""
    plt = _pyplot()
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
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise SystemExit("plots need matplotlib: pip install 'fastserve[plot]'") from exc
    return plt
