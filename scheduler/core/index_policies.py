"""Policies that order jobs by an index of normalized-latency weight per unit
of remaining cost, and hold a long prefill back while the running jobs that
it would slow down are about to finish.

- `gittins` (what `default` means): does not know output lengths; learns their
  distribution per prompt-length bucket from finished jobs (length_model.py)
  and orders by the Gittins index of that distribution.
- `oracle`: knows every output length (simulation only): the same structure
  with exact quantities (Smith's ratio on the remaining cost). The practical
  clairvoyant yardstick; not a lower bound (scheduler/sim/bound.py computes one).

Why these differ from skip-join MLFQ. Normalized latency divides each job's
latency by its output tokens, so a job's weight is 1/X; and what a job costs
the others is seconds of iteration time, of which a long prompt's prefill is
most. MLFQ charges and demotes by seconds, so a 1500-token prompt with a
40-token answer lands in a low queue and waits behind chat jobs whose every
token weighs less. An index of weight over remaining cost orders both kinds
on one scale; a prefill counts in a fresh job's cost, and not any more once done.

Prefill deferral. A prefill of P seconds of marginal cost makes the iteration
it joins P longer for every running job. Holding it back for the T decode
iterations (tau seconds each) in which running jobs of total expected weight
S(T) would finish saves them P * S(T), and costs tau * T times the weight rate
of the delay: the job's own weight, the jobs waiting behind it (their
prefills slip too) and the jobs arriving meanwhile that the prefill will then
slow down (arrival weight rate * P). The prefill waits when, for some T,
P * S(T) > T * tau * (that rate).
"""
from __future__ import annotations

import math
from collections import deque
from typing import TYPE_CHECKING, Sequence

import numpy as np

from fastserve.scheduler.core.cost_model import CostModel
from fastserve.scheduler.core.length_model import OutputLengthModel
from fastserve.scheduler.core.policies import Policy

if TYPE_CHECKING:
    from fastserve.scheduler.core.job import Job


class ArrivalWindow:
    """Weight and rate of the last `size` arrivals: O(1) per arrival."""

    def __init__(self, size: int = 64) -> None:
        self._q: deque[tuple[float, float]] = deque(maxlen=size)
        self._sum = 0.0

    def add(self, now: float, weight: float) -> None:
        if len(self._q) == self._q.maxlen:
            self._sum -= self._q[0][1]
        self._q.append((now, weight))
        self._sum += weight

    @property
    def mean_weight(self) -> float:
        return self._sum / len(self._q) if self._q else 0.0

    @property
    def weight_rate(self) -> float:
        """Weight arriving per second (0 until two arrivals are apart in time)."""
        if len(self._q) < 2:
            return 0.0
        span = self._q[-1][0] - self._q[0][0]
        return (self._sum - self._q[0][1]) / span if span > 0 else 0.0


class _IndexPolicy(Policy):
    rekey = True

    def _setup(self, max_batch_size: int) -> None:
        self.max_batch_size = max_batch_size
        self.arrivals = ArrivalWindow()

    def _prefill_left(self, job: Job, tokens: int | None = None) -> float:
        """Marginal seconds of the next `tokens` (default: all remaining) prompt tokens."""
        cm = self.cost_model
        done = job.num_computed
        end = job.spec.input_len if tokens is None else done + tokens
        if end <= done:
            return 0.0

        def marginal(t: int) -> float:  # as CostModel.iteration_time charges a prefill
            return max(cm.prefill_time(t) - cm.overhead, 0.0) if t > 0 else 0.0

        return max(marginal(end) - marginal(done), 1e-9)

    def _decode_iteration(self, batch: Sequence[tuple[Job, int]]) -> tuple[list[Job], float]:
        """The decoding jobs of a batch and the time of a decode-only iteration of them."""
        dec = [j for j, n in batch if n == 1 and j.num_computed >= j.spec.input_len]
        if not dec:
            return dec, 0.0
        ctx = sum(j.num_computed + 1 for j in dec) / len(dec)
        return dec, self.cost_model.decode_time(len(dec), ctx)

    def _delay_rate(self, job: Job, own_weight: float, prefill: float, waiting: int) -> float:
        """Normalized-latency weight per second of holding this prefill back."""
        behind = max(waiting - (0 if job.started else 1), 0)
        w = self.arrivals
        return own_weight + behind * w.mean_weight + prefill * w.weight_rate


class GittinsPolicy(_IndexPolicy):
    """Highest Gittins index first, with prefill deferral (module docstring).

    Two levels: jobs join level 1; a job that has not run for
    `starvation_patience` x the core's starvation threshold (800 x SLO by
    default) is promoted to level 0 and goes back after `PROMOTED_QUANTA` base
    quanta of service. A backstop, not a scheduling rule: the index already
    serves jobs by value, and an earlier promotion turns an overloaded server
    into FCFS among the starving (4x: worse than fcfs 30% above capacity;
    benchmarks/results/policies.md)."""

    starvation_patience = 16.0
    PROMOTED_QUANTA = 8

    @classmethod
    def build(cls, *, cost_model: CostModel, base_quantum: float, max_batch_size: int,
              max_model_len: int) -> GittinsPolicy:
        p = cls("gittins", (cls.PROMOTED_QUANTA * base_quantum, math.inf), starvation=True, cost_model=cost_model)
        p._setup(max_batch_size)
        p.lengths = OutputLengthModel(cost_model, max_batch_size, max_model_len)
        return p

    def join_level(self, input_len: int) -> int:
        return 1

    def key(self, job: Job) -> tuple:
        m = self.lengths
        if job.num_computed < job.spec.input_len:
            return (-m.fresh_index(job.spec.input_len, self._prefill_left(job)), job.seq)
        return (-float(m.started[m.bucket(job.spec.input_len), m.age_bin(job.num_generated)]), job.seq)

    def arrive(self, job: Job, now: float) -> None:
        self.arrivals.add(now, float(self.lengths.expected_weight[self.lengths.bucket(job.spec.input_len)]))

    def observe(self, job: Job) -> None:
        self.lengths.observe(job.spec.input_len, job.num_generated)

    def defer_prefill(self, job: Job, tokens: int, batch: Sequence[tuple[Job, int]], waiting: int) -> bool:
        dec, tau = self._decode_iteration(batch)
        if not dec:
            return False
        m = self.lengths
        rows = [m.bucket(j.spec.input_len) for j in dec]
        ages = [m.age_bin(j.num_generated) for j in dec]
        finishing = m.completion_weight[rows, ages].sum(axis=0)  # S(H) per horizon
        p = self._prefill_left(job, tokens)
        own = float(m.expected_weight[m.bucket(job.spec.input_len)])
        rate = self._delay_rate(job, own, p, waiting)
        return bool(np.max(p * finishing - m.horizons * tau * rate) > 0)


class OraclePolicy(_IndexPolicy):
    """Knows output lengths: smallest output x remaining cost first (Smith's
    rule for weight 1/output), with the same deferral on exact completions."""

    @classmethod
    def build(cls, *, cost_model: CostModel, base_quantum: float, max_batch_size: int,
              max_model_len: int) -> OraclePolicy:
        p = cls("oracle", (math.inf,), starvation=False, cost_model=cost_model)
        p._setup(max_batch_size)
        return p

    @staticmethod
    def _output(job: Job) -> int:
        if job.spec.output_len is None:
            raise ValueError(f"job {job.id}: the oracle policy needs output_len (simulation only)")
        return job.spec.output_len

    def key(self, job: Job) -> tuple:
        a0, b, c = self.cost_model.overhead, self.cost_model.decode_coef[1], self.cost_model.decode_coef[2]
        rem = job.remaining_tokens
        ctx = job.spec.input_len + job.num_generated
        cost = self._prefill_left(job) + rem * (b + c * (ctx + rem / 2) + a0 / self.max_batch_size)
        return (self._output(job) * cost, job.seq)

    def arrive(self, job: Job, now: float) -> None:
        self.arrivals.add(now, 1.0 / self._output(job))

    def defer_prefill(self, job: Job, tokens: int, batch: Sequence[tuple[Job, int]], waiting: int) -> bool:
        dec, tau = self._decode_iteration(batch)
        if not dec:
            return False
        p = self._prefill_left(job, tokens)
        rate = self._delay_rate(job, 1.0 / self._output(job), p, waiting)
        finishing = 0.0
        for rem, w in sorted((j.remaining_tokens, 1.0 / self._output(j)) for j in dec):
            finishing += w
            if p * finishing > rem * tau * rate:
                return True
        return False
