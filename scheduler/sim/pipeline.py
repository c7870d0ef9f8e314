"""The simulator for a replica split over P pipeline stages.

Stage k of a batch starts when stage k-1 of it is done (plus the activation
transfer) and stage k of the batch before is done; each stage takes 1/P of the
batch's time (balanced stages, the cost model timing the whole model). Up to P
batches are in the pipe and one more waits at its door, as the scheduler
service keeps them; a job's next iteration comes P batches later (its token
returns from the last stage), so the core runs with reschedule_gap = P.
Bubbles appear when a stage waits: at the start, when a batch is small, or
when the scheduler has nothing to send. The core decides and charges by the
per-stage cost (CostModel.per_stage), as the service does with the worker's
slowest-stage time.
"""
from __future__ import annotations

from collections import deque

from fastserve.scheduler.core.cost_model import CostModel
from fastserve.scheduler.core.types import IterationResult
from fastserve.scheduler.sim.metrics import summarize


def simulate_pipeline(jobs, cfg, cost: CostModel, policy_cost: CostModel | None = None, prepare=None):
    from fastserve.scheduler.sim.simulator import SimResult, Trace, build_core

    P = cfg.pipeline_parallel_size
    core = build_core(cfg, (policy_cost or cost).per_stage(P))
    if prepare is not None:
        prepare(core)
    tr = Trace(jobs)
    stage_free = [0.0] * P
    busy = 0.0  # sum of stage-seconds of work done
    inflight: deque = deque()  # (done_at, decision, stage_seconds), in order
    job_iterations: dict[str, list[int]] = {}
    t, peak = 0.0, 0
    while tr.arrivals_left or core.num_jobs or inflight:
        tr.admit(core, t)
        tr.land_copies(core, t)
        while inflight and inflight[0][0] <= t:
            done_at, d, stage_s = inflight.popleft()
            finished = [e.job_id for e in d.batch if e.sample and tr.token(e.job_id, done_at)]
            core.update(IterationResult(d.iteration, stage_s, finished), done_at)
        scheduled = False
        if len(inflight) <= P and stage_free[0] <= t:
            d = core.schedule(t)
            tr.start_moves(d, t, cost, cfg.copy_bandwidth)
            peak = max(peak, core.gpu_blocks_used())
            if d.batch:
                stage_s = cost.iteration_time(d.batch) / P
                start = t
                for k in range(P):
                    start = max(start, stage_free[k]) + (cfg.stage_transfer if k else 0.0)
                    stage_free[k] = start + stage_s
                    start = stage_free[k]
                busy += stage_s * P
                inflight.append((stage_free[-1] + cfg.control_overhead, d, stage_s))
                for e in d.batch:
                    ran = job_iterations.setdefault(e.job_id, [0, 0])
                    ran[0] += 1
                    ran[1] += int(e.is_prefill)
                scheduled = True
            else:
                core.update(IterationResult(d.iteration, 0.0, []), t)
        if scheduled:
            continue
        nexts = tr.next_events() + ([inflight[0][0]] if inflight else [])
        if len(inflight) <= P and stage_free[0] > t:
            nexts.append(stage_free[0])
        if not nexts:
            if not (tr.arrivals_left or core.num_jobs):
                break  # the last results just came back
            raise RuntimeError(f"simulation stalled at t={t:.3f}: {core.num_jobs} jobs left, nothing can run")
        t = max(t, min(nexts))
    records = tr.records
    assert len(records) == len(tr.pending), f"{len(tr.pending) - len(records)} jobs lost"
    metrics = summarize(records, core.stats.as_dict(), len(core.join_histogram))
    metrics["peak_gpu_blocks"] = peak
    metrics["slo"] = core.slo
    span = max((r.finish for r in records), default=0.0)
    metrics["stage_busy_fraction"] = busy / (P * span) if span else 0.0
    return SimResult(metrics, records, peak, core.iteration, core.slo, job_iterations)
