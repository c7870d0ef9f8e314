"""Estimated next scheduled time (ENST, DESIGN.md): how long until a job is
expected to be in the batch again. The KV placement offloads the jobs that
will run last and uploads those that will run first."""
from __future__ import annotations

from typing import Sequence


def work_ahead_by_level(counts: Sequence[int], charge_sums: Sequence[float], quanta: Sequence[float]) -> list[float]:
    """Per level k: the service (seconds) that the jobs in levels above k will
    receive before they sink to level k: what is left of their own level's
    quantum plus the quanta of the levels in between. O(levels^2)."""
    cum = [0.0]
    for q in quanta:
        cum.append(cum[-1] + q)
    out = []
    for k in range(len(quanta)):
        a = 0.0
        for i in range(k):
            a += counts[i] * quanta[i] - charge_sums[i] + counts[i] * (cum[k] - cum[i + 1])
        out.append(a)
    return out


def enst(work_ahead: float, pos: int, quantum: float, batch_size: int, starve_remaining: float | None) -> float:
    """`work_ahead`: from work_ahead_by_level for the job's level; `pos`: jobs
    ahead of it in its own level (each assumed to use a full quantum); the
    batch serves batch_size jobs at once. Starvation promotion caps it."""
    work = (work_ahead + pos * quantum) / batch_size
    return work if starve_remaining is None else min(work, max(starve_remaining, 0.0))
