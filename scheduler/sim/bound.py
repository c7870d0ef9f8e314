"""A lower bound on mean normalized latency (JCT / output tokens) that no
schedule of a trace can beat, under the simulator's cost model.

Why it holds. An iteration costs overhead `a` plus each member's marginal
cost (prefill tokens' marginal, or a decode step's b + c * context), and holds
at most B jobs, so its time is at least the sum over members of (marginal +
a/B). Spread each member's share uniformly over the iteration: that is a
schedule of one machine of rate 1 on which job j needs work p_j (its
marginals plus a/B per iteration it takes part in), released at its arrival.
For weights w_j = 1/output_j:

1. Mean busy time. On one machine with preemption, the schedule that always
   runs the released job of highest w_j / p_j minimises sum w_j M_j, M_j being
   the mean time at which j's work is done (Goemans, "Improved approximation
   algorithms for scheduling with release dates", SODA 1997: this is the LP
   relaxation in mean busy times). The real schedule is one such machine
   schedule, so its sum w_j M_j is at least that minimum.
2. From mean busy time to completion. j runs its iterations in order, each at
   least as long as when j runs alone (prefill, then decodes at growing
   context), the last one ending at C_j. Its work is therefore done no later,
   on average, than if those minimal iterations were packed back to back up
   to C_j: M_j <= C_j - D_j with D_j computed from that packing.
3. Alone. C_j >= r_j + (time of j's iterations alone).

Bound = max(sum w_j (M*_j + D_j - r_j), sum w_j T_alone_j) / n, both sums
being lower bounds on sum w_j (C_j - r_j). It ignores the token budget, memory
and the one-token-per-iteration limit when computing M* (relaxations only
loosen it), so it is valid but not tight: no policy reaches it, and the gap
to the clairvoyant `oracle` policy is part of what it measures.
"""
from __future__ import annotations

import heapq
import math
from dataclasses import dataclass
from typing import Sequence

from fastserve.scheduler.core.cost_model import CostModel
from fastserve.scheduler.sim.workload import TraceJob


@dataclass(frozen=True)
class Bound:
    mean_norm_latency: float
    busy_time_part: float  # the mean-busy-time bound alone
    alone_part: float  # the run-alone bound alone


def _job_terms(job: TraceJob, cost: CostModel, max_batch: int, max_tokens: int) -> tuple[float, float, float]:
    """(work p_j, D_j, alone time) of one job."""
    a = cost.overhead

    def marginal_prefill(tokens: int) -> float:  # as CostModel.iteration_time charges it
        return max(cost.prefill_time(tokens) - a, 0.0) if tokens > 0 else 0.0

    share = a / max_batch
    iters: list[tuple[float, float]] = []  # (minimal duration, work) in run order
    done = 0
    while done < job.input_len:  # prefill, chunked by the token budget
        n = min(max_tokens, job.input_len - done)
        marginal = marginal_prefill(done + n) - marginal_prefill(done)
        iters.append((a + marginal, marginal + share))
        done += n
    for k in range(1, job.output_len):  # decode steps at context input + k
        marginal = cost.decode_time(1, job.input_len + k) - a
        iters.append((a + marginal, marginal + share))
    work = sum(v for _, v in iters)
    alone = sum(d for d, _ in iters)
    # Packed back to back ending at C: iteration k's midpoint is C - (later durations + d_k / 2).
    later = 0.0
    weighted = 0.0
    for d, v in reversed(iters):
        weighted += v * (later + d / 2)
        later += d
    return work, weighted / work, alone


def _min_weighted_busy_time(release: Sequence[float], work: Sequence[float], weight: Sequence[float]) -> float:
    """sum w_j M_j of the preemptive highest-w/p-first schedule on one machine."""
    order = sorted(range(len(release)), key=lambda j: release[j])
    heap: list[tuple[float, int]] = []  # (-density, job)
    left = list(work)
    busy = [0.0] * len(work)  # integral of t over j's work
    t = 0.0
    i = 0
    while i < len(order) or heap:
        if not heap:
            t = max(t, release[order[i]])
        while i < len(order) and release[order[i]] <= t:
            j = order[i]
            heapq.heappush(heap, (-weight[j] / work[j], j))
            i += 1
        _, j = heap[0]
        until = release[order[i]] if i < len(order) else math.inf
        run = min(left[j], until - t)
        busy[j] += run * (t + run / 2)
        left[j] -= run
        t += run
        if left[j] <= 1e-15:
            heapq.heappop(heap)
    return sum(weight[j] * busy[j] / work[j] for j in range(len(work)))


def lower_bound(jobs: Sequence[TraceJob], cost: CostModel, *, max_batch_size: int = 32,
                max_tokens_per_batch: int = 2048) -> Bound:
    if not jobs:
        raise ValueError("no jobs")
    terms = [_job_terms(j, cost, max_batch_size, max_tokens_per_batch) for j in jobs]
    weight = [1.0 / j.output_len for j in jobs]
    release = [j.arrival_time for j in jobs]
    work = [p for p, _, _ in terms]
    busy = _min_weighted_busy_time(release, work, weight)
    n = len(jobs)
    busy_part = (busy + sum(w * (d - r) for w, (_, d, _), r in zip(weight, terms, release))) / n
    alone_part = sum(w * t for w, (_, _, t) in zip(weight, terms)) / n
    return Bound(max(busy_part, alone_part), busy_part, alone_part)
