"""Cost of one schedule()+update() of the scheduler core as the number of
waiting jobs grows (the batch size fixed). Finished jobs are replaced by new
arrivals outside the timed region so the waiting count stays put.

Two memory regimes, each measured at every size; in both the GPU pool fills
up (jobs are admitted while blocks are free, and their outputs grow), so the
placement policy works every iteration:
- `default`: a GPU pool of 4096 blocks, a host pool of 16384, copies done by
  the next iteration;
- `pressure`: a GPU pool of 1024 blocks (a few batches' worth of KV), a host
  pool of 4096, copies that take 5 iterations: hundreds of jobs sit swapped
  out and moves are always in flight.
Copy reports (copy_done) are inside the timed region: they are the core's work.
Wall time and this thread's CPU time are both reported: on a machine shared
with other work the wall-time tail measures the other work's preemptions, the
CPU-time tail what the scheduler itself costs.

Every `snapshot_every` iterations the dashboard's snapshot of the core
(core.snapshot()) is taken outside the timed region and timed on its own: its
cost must not grow with the number of waiting jobs either.
"""
from __future__ import annotations

import collections
import gc
import random
import time

import numpy as np

from fastserve.scheduler.core.config import SchedulerCoreConfig
from fastserve.scheduler.core.cost_model import CostModel
from fastserve.scheduler.core.placement import make_kv_policy
from fastserve.scheduler.core.scheduler import SchedulerCore
from fastserve.scheduler.core.types import IterationResult, JobSpec

REGIMES = {
    "default": {"num_gpu_blocks": 4096, "num_host_blocks": 16384, "copy_iterations": 1},
    "pressure": {"num_gpu_blocks": 1024, "num_host_blocks": 4096, "copy_iterations": 5},
}


def bench_one(waiting: int, batch: int, *, policy: str = "sj-mlfq", kv_policy: str = "proactive",
              regime: str = "default", iterations: int = 2000, warmup: int = 100, seed: int = 0,
              snapshot_every: int = 10) -> dict:
    cost = CostModel.default()
    r = REGIMES[regime]
    cfg = SchedulerCoreConfig(policy=policy, max_batch_size=batch, num_gpu_blocks=max(r["num_gpu_blocks"], batch * 16),
                              num_host_blocks=r["num_host_blocks"])
    core = SchedulerCore(cfg, cost, make_kv_policy(kv_policy))
    rng = random.Random(seed)
    out: dict[str, int] = {}
    gen: dict[str, int] = {}
    copies: collections.deque[list[tuple[str, int]]] = collections.deque([[] for _ in range(r["copy_iterations"])])
    counter = 0

    def arrive(now: float) -> None:
        nonlocal counter
        jid = f"b{counter}"
        counter += 1
        n_out = rng.randint(8, 256)
        core.add_job(JobSpec(jid, now, rng.randint(16, 512), 1024, n_out), now)
        out[jid], gen[jid] = n_out, 0

    for _ in range(waiting + batch):
        arrive(0.0)
    # The jobs made above are long-lived; keep the cyclic GC from walking them
    # on every collection (a service would do the same after warm-up).
    gc.collect()
    gc.freeze()
    now = 0.0
    samples, cpu = [], []
    snapshots = []
    swapped = []
    for it in range(warmup + iterations):
        c0 = time.thread_time_ns()
        t0 = time.perf_counter_ns()
        for jid, move_id in copies.popleft():
            core.copy_done(jid, move_id, now)
        d = core.schedule(now)
        t1 = time.perf_counter_ns()
        c1 = time.thread_time_ns()
        copies.append([(m.job_id, m.move_id) for m in (*d.offloads, *d.uploads)])
        elapsed = cost.iteration_time(d.batch)
        now += elapsed
        finished = []
        for e in d.batch:
            if e.sample:
                gen[e.job_id] += 1
                if gen[e.job_id] >= out[e.job_id]:
                    finished.append(e.job_id)
        c2 = time.thread_time_ns()
        t2 = time.perf_counter_ns()
        core.update(IterationResult(d.iteration, elapsed, finished), now)
        t3 = time.perf_counter_ns()
        c3 = time.thread_time_ns()
        if it >= warmup:
            samples.append((t1 - t0 + t3 - t2) / 1e3)
            cpu.append((c1 - c0 + c3 - c2) / 1e3)
            swapped.append(core.num_swapped)
        for jid in finished:
            del out[jid], gen[jid]
            arrive(now)
        if it >= warmup and it % snapshot_every == 0:
            t4 = time.perf_counter_ns()
            core.snapshot()
            snapshots.append((time.perf_counter_ns() - t4) / 1e3)
    gc.unfreeze()
    a = np.array(samples)
    c = np.array(cpu)
    snap = np.array(snapshots)
    return {"p50_us": float(np.percentile(a, 50)), "p99_us": float(np.percentile(a, 99)),
            "cpu_p50_us": float(np.percentile(c, 50)), "cpu_p99_us": float(np.percentile(c, 99)),
            "mean_us": float(a.mean()), "max_us": float(a.max()), "iterations": iterations,
            "jobs_in_core_at_end": core.num_jobs, "finished": core.stats.finished,
            "mean_jobs_swapped": float(np.mean(swapped)), "swaps": core.stats.swaps,
            "promotions": core.stats.promotions, "demotions": core.stats.demotions,
            "snapshot_p50_us": float(np.percentile(snap, 50)), "snapshot_p99_us": float(np.percentile(snap, 99))}


def bench_scheduler(sizes: list[int], batch: int, regimes: tuple[str, ...] = tuple(REGIMES), **kw) -> dict:
    out: dict = {"batch": batch, "policy": kw.get("policy", "sj-mlfq"), "kv_policy": kw.get("kv_policy", "proactive")}
    for regime in regimes:
        res = {str(n): bench_one(n, batch, regime=regime, **kw) for n in sizes}
        small, large = res[str(min(sizes))], res[str(max(sizes))]
        # The baseline is the smallest size, measured in the same run.
        out[regime] = {"waiting": res, "p99_ratio_largest_vs_smallest": large["p99_us"] / small["p99_us"],
                       "cpu_p99_ratio_largest_vs_smallest": large["cpu_p99_us"] / small["cpu_p99_us"],
                       "snapshot_p99_ratio_largest_vs_smallest": large["snapshot_p99_us"] / small["snapshot_p99_us"]}
    return out
