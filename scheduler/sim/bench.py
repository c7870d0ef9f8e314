"""Cost of one schedule()+update() of the scheduler core as the number of
waiting jobs grows (the batch size fixed). Finished jobs are replaced by new
arrivals outside the timed region so the waiting count stays put."""
from __future__ import annotations

import gc
import random
import time

import numpy as np

from fastserve.scheduler.core.placement import make_kv_policy

from fastserve.scheduler.core.config import SchedulerCoreConfig
from fastserve.scheduler.core.scheduler import SchedulerCore
from fastserve.scheduler.core.cost_model import CostModel
from fastserve.scheduler.core.types import IterationResult, JobSpec


def bench_one(waiting: int, batch: int, *, policy: str = "sj-mlfq", kv_policy: str = "proactive",
              iterations: int = 2000, warmup: int = 100, seed: int = 0) -> dict:
    cost = CostModel.default()
    cfg = SchedulerCoreConfig(policy=policy, max_batch_size=batch, num_gpu_blocks=max(4096, batch * 160),
                              num_host_blocks=16384)
    core = SchedulerCore(cfg, cost, make_kv_policy(kv_policy))
    rng = random.Random(seed)
    out: dict[str, int] = {}
    gen: dict[str, int] = {}
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
    samples = []
    for it in range(warmup + iterations):
        t0 = time.perf_counter_ns()
        d = core.schedule(now)
        t1 = time.perf_counter_ns()
        elapsed = cost.iteration_time(d.batch)
        now += elapsed
        finished = []
        for e in d.batch:
            if e.sample:
                gen[e.job_id] += 1
                if gen[e.job_id] >= out[e.job_id]:
                    finished.append(e.job_id)
        t2 = time.perf_counter_ns()
        core.update(IterationResult(d.iteration, elapsed, finished), now)
        t3 = time.perf_counter_ns()
        if it >= warmup:
            samples.append((t1 - t0 + t3 - t2) / 1e3)
        for jid in finished:
            del out[jid], gen[jid]
            arrive(now)
    gc.unfreeze()
    a = np.array(samples)
    return {"p50_us": float(np.percentile(a, 50)), "p99_us": float(np.percentile(a, 99)),
            "mean_us": float(a.mean()), "max_us": float(a.max()), "iterations": iterations,
            "jobs_in_core_at_end": core.num_jobs, "promotions": core.stats.promotions,
            "demotions": core.stats.demotions}


def bench_scheduler(sizes: list[int], batch: int, **kw) -> dict:
    res = {str(n): bench_one(n, batch, **kw) for n in sizes}
    small, large = res[str(min(sizes))], res[str(max(sizes))]
    return {"batch": batch, "policy": kw.get("policy", "sj-mlfq"), "waiting": res,
            # The baseline is the smallest size, measured in the same run.
            "p99_ratio_largest_vs_smallest": large["p99_us"] / small["p99_us"]}
