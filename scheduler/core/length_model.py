"""What the scheduler learns about output lengths, and the index tables the
`gittins` policy orders jobs by.

The scheduler knows a job's prompt length but not its output length X. It
keeps, per prompt-length bucket, a histogram of the output lengths of the jobs
that finished (shrunk towards the pooled histogram, itself shrunk towards a
broad prior, and slowly forgotten so that it follows a changing workload).
From it, for a job with prompt in bucket b that has generated g tokens:

- the Gittins index (Sevcik's rank with completion rewards): the best ratio,
  over how much more to serve it (up to the end of output bin t), of the
  expected normalized-latency weight 1/X it would complete, to the expected
  service time that takes:

      G(b, g) = max_t  E[1/X ; X <= x_t | X > g] / E[cost(min(X, x_t)) - cost(g) | X > g]

  with cost(n) = the decode steps' marginal cost (b + c * context each, plus a
  share of the per-iteration overhead: a / max_batch_size) and, before the
  prompt has been processed, its prefill's marginal cost. In the M/G/1 queue,
  serving the highest index first minimises the mean weighted response time
  among all policies that do not know job sizes (Gittins; Sevcik 1974); here
  it is a heuristic for the batched server, justified by the measurements.
- completion_weight[b, g, h] = E[1/X ; X <= g + H_h | X > g]: the weight
  expected to finish within the next H_h tokens (the prefill deferral's input).

Every table has a fixed size (buckets x bins), so rebuilding costs the same
whatever the number of jobs; one bucket's tables are rebuilt every
`rebuild_every / buckets` finished jobs, round robin (~0.1 ms each).
"""
from __future__ import annotations

import bisect
import math

import numpy as np

from fastserve.scheduler.core.cost_model import CostModel


def _output_bins(max_len: int) -> list[int]:
    """Lower edges: every length up to 8, then steps of 2^(1/4) (about 19%)."""
    lo = list(range(1, min(8, max_len) + 1))
    x = 8.0
    while True:
        x *= 2 ** 0.25
        v = int(round(x))
        if v > max_len:
            return lo
        if v > lo[-1]:
            lo.append(v)


class OutputLengthModel:
    # Horizons (tokens from now) at which completion_weight is tabulated.
    HORIZONS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048)

    def __init__(self, cost_model: CostModel, max_batch_size: int, max_len: int, *,
                 prior_median: float = 128.0, prior_sigma: float = 1.5, prior_jobs: float = 8.0,
                 shrink_jobs: float = 8.0, rebuild_every: int = 32, half_life_jobs: float = 4096.0) -> None:
        self.cost_model = cost_model
        self.max_batch_size = max_batch_size
        self.lo = _output_bins(max_len)
        hi = self.lo[1:] + [max_len + 1]
        self.x = np.array([(lo + h - 1) / 2 for lo, h in zip(self.lo, hi)])  # bin midpoints
        self.w = 1.0 / self.x
        # Prompt-length buckets: steps of sqrt(2) from 16 tokens.
        self.in_edges = []
        e = 16.0
        while e < max_len:
            self.in_edges.append(int(e))
            e *= math.sqrt(2)
        lows = [1] + self.in_edges
        highs = self.in_edges + [max_len]
        self.in_rep = np.array([math.sqrt(lo * h) for lo, h in zip(lows, highs)])
        n_in, n_out = len(lows), len(self.lo)
        # The prior: a broad lognormal over the bins (ASSUMPTION: median 128
        # tokens, sigma 1.5 in log space), worth `prior_jobs` finished jobs.
        z = (np.log(self.x) - math.log(prior_median)) / prior_sigma
        mass = np.exp(-z * z / 2) * (np.array(hi) - np.array(self.lo))
        self.prior = prior_jobs * mass / mass.sum()
        self.counts = np.zeros((n_in, n_out))
        self.shrink_jobs = shrink_jobs
        self.rebuild_every = rebuild_every
        self.decay = 0.5 ** (rebuild_every / half_life_jobs)
        self.observed = 0
        self.horizons = np.array(self.HORIZONS, dtype=float)
        self._build()

    # -------------------------------------------------------------- learning
    def bucket(self, input_len: int) -> int:
        return bisect.bisect_left(self.in_edges, input_len)

    def age_bin(self, generated: int) -> int:
        """The bin of the next token: the tables condition on X > generated."""
        return bisect.bisect_right(self.lo, generated + 1) - 1

    def observe(self, input_len: int, output_len: int) -> None:
        self.counts[self.bucket(input_len), self.age_bin(output_len - 1)] += 1.0
        self.observed += 1
        # One bucket's tables at a time, round robin, so that no single call
        # pays for all of them: every bucket is rebuilt once per
        # `rebuild_every` finished jobs.
        if self.observed % self._rebuild_step == 0:
            k = self._next_bucket
            if k == 0:
                self.counts *= self.decay
            self._build_bucket(k, self._pooled())
            self._next_bucket = (k + 1) % len(self.in_rep)

    def _pooled(self) -> np.ndarray:
        pooled = self.counts.sum(axis=0) + self.prior
        return pooled / pooled.sum()

    def distribution(self) -> np.ndarray:
        """P(X in bin j | bucket b), shape (buckets, bins)."""
        p = self.counts + self.shrink_jobs * self._pooled()
        return p / p.sum(axis=1, keepdims=True)

    # ---------------------------------------------------------------- tables
    def _build(self) -> None:
        n_in, n_out = self.counts.shape
        self.started = np.zeros((n_in, n_out))
        self.expected_weight = np.zeros(n_in)
        self.completion_weight = np.zeros((n_in, n_out, len(self.horizons)))
        self._num0, self._s1_0, self._s2_0 = (np.zeros((n_in, n_out)) for _ in range(3))
        ages = np.array([lo - 1 for lo in self.lo], dtype=float)  # g at the start of each bin
        self._ages = ages
        self._upper = np.triu(np.ones((n_out, n_out))) > 0  # [a, j]: bin j can still end a job of age g_a
        self._d = np.maximum(self.x[None, :] - ages[:, None], 0.0)  # x_j - g_a
        self._served_to = self.x[None, :] - ages[:, None]  # x_t - g_a
        self._cw_idx = np.searchsorted(self.x, ages[:, None] + self.horizons[None, :], side="right")  # (A, H)
        self._rebuild_step = max(self.rebuild_every // n_in, 1)
        self._next_bucket = 0
        pooled = self._pooled()
        for k in range(n_in):
            self._build_bucket(k, pooled)

    def _build_bucket(self, k: int, pooled: np.ndarray) -> None:
        p = self.counts[k] + self.shrink_jobs * pooled
        p /= p.sum()
        w, ages = self.w, self._ages
        a0, b, c = self.cost_model.overhead, self.cost_model.decode_coef[1], self.cost_model.decode_coef[2]
        # Conditional on X > g_a: the mass of bins j >= a, renormalised. (A, J)
        cond = np.where(self._upper, p[None, :], 0.0)
        cond /= cond.sum(axis=1, keepdims=True)
        # Stopping after bin t (t >= a): weight completed, and tokens served.
        done = np.cumsum(cond, axis=1)  # P(X <= x_t | X > g)
        num = np.cumsum(cond * w, axis=1)
        left = self._served_to * (1 - done)
        s1 = np.cumsum(cond * self._d, axis=1) + left
        s2 = np.cumsum(cond * self._d ** 2, axis=1) + self._served_to * left
        # Decode cost per token at the bucket's typical context, growing with the output.
        u = b + c * (self.in_rep[k] + ages[:, None]) + a0 / self.max_batch_size
        den = u * s1 + c / 2 * s2
        ok = self._upper & (den > 0)
        self.started[k] = np.where(ok, num / np.where(ok, den, 1.0), 0.0).max(axis=1)
        # Fresh jobs: the prefill's marginal cost is added per job (fresh_index).
        self._num0[k], self._s1_0[k], self._s2_0[k] = num[0], s1[0], s2[0]
        self.expected_weight[k] = float((p * w).sum())
        # completion_weight[k, a, h] = E[1/X ; X <= g_a + H_h | X > g_a]
        cw = np.concatenate([np.zeros((len(ages), 1)), num], axis=1)
        self.completion_weight[k] = np.take_along_axis(cw, self._cw_idx, axis=1)

    def fresh_index(self, input_len: int, prefill_seconds: float) -> float:
        """Index of a job whose prompt still needs `prefill_seconds` of marginal cost."""
        k = self.bucket(input_len)
        a0, b, c = self.cost_model.overhead, self.cost_model.decode_coef[1], self.cost_model.decode_coef[2]
        u = b + c * input_len + a0 / self.max_batch_size
        den = prefill_seconds + u * self._s1_0[k] + c / 2 * self._s2_0[k]
        return float(np.max(self._num0[k] / den))
