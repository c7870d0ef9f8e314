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

import heapq
from collections import deque

from fastserve.scheduler.core.cost_model import CostModel
from fastserve.scheduler.core.types import IterationResult, JobSpec
from fastserve.scheduler.sim.metrics import JobRecord, summarize


def simulate_pipeline(jobs, cfg, cost: CostModel, policy_cost: CostModel | None = None):
    from fastserve.scheduler.sim.simulator import SimResult, build_core

    P = cfg.pipeline_parallel_size
    core = build_core(cfg, (policy_cost or cost).per_stage(P))
    pending = sorted(jobs, key=lambda j: j.arrival_time)
    out_len: dict[str, int] = {}
    generated: dict[str, int] = {}
    arrival: dict[str, float] = {}
    first: dict[str, float] = {}
    joined: dict[str, int] = {}
    records: list[JobRecord] = []
    copies: list[tuple[float, int, str]] = []
    link_free = {"offload": 0.0, "upload": 0.0}
    stage_free = [0.0] * P
    busy = 0.0  # sum of stage-seconds of work done
    inflight: deque = deque()  # (done_at, decision, stage_seconds), in order
    job_iterations: dict[str, list[int]] = {}
    t, nxt, peak = 0.0, 0, 0
    while nxt < len(pending) or core.num_jobs or inflight:
        while nxt < len(pending) and pending[nxt].arrival_time <= t:
            j = pending[nxt]
            jid = f"j{nxt}"
            core.add_job(JobSpec(jid, j.arrival_time, j.input_len, j.output_len, j.output_len), j.arrival_time)
            out_len[jid], generated[jid], arrival[jid] = j.output_len, 0, j.arrival_time
            joined[jid] = core.job_level(jid)
            nxt += 1
        while copies and copies[0][0] <= t:
            _, move_id, jid = heapq.heappop(copies)
            core.copy_done(jid, move_id, t)
        while inflight and inflight[0][0] <= t:
            done_at, d, stage_s = inflight.popleft()
            finished = []
            for e in d.batch:
                if not e.sample or e.job_id not in generated or generated[e.job_id] >= out_len[e.job_id]:
                    continue
                jid = e.job_id
                generated[jid] += 1
                first.setdefault(jid, done_at)
                if generated[jid] == out_len[jid]:
                    finished.append(jid)
                    records.append(JobRecord(jid, arrival[jid], first[jid], done_at, 0, out_len[jid], joined[jid]))
            core.update(IterationResult(d.iteration, stage_s, finished), done_at)
        scheduled = False
        if len(inflight) <= P and stage_free[0] <= t:
            d = core.schedule(t)
            for mv in d.offloads + d.uploads:
                start = max(t, link_free[mv.direction])
                link_free[mv.direction] = start + cost.copy_time(len(mv.gpu_blocks), cfg.copy_bandwidth)
                heapq.heappush(copies, (link_free[mv.direction], mv.move_id, mv.job_id))
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
        nexts = [inflight[0][0]] if inflight else []
        if len(inflight) <= P and stage_free[0] > t:
            nexts.append(stage_free[0])
        if copies:
            nexts.append(copies[0][0])
        if nxt < len(pending):
            nexts.append(pending[nxt].arrival_time)
        if not nexts:
            if not (nxt < len(pending) or core.num_jobs):
                break  # the last results just came back
            raise RuntimeError(f"simulation stalled at t={t:.3f}: {core.num_jobs} jobs left, nothing can run")
        t = max(t, min(nexts))
    assert len(records) == len(pending), f"{len(pending) - len(records)} jobs lost"
    metrics = summarize(records, core.stats.as_dict(), len(core.join_histogram))
    metrics["peak_gpu_blocks"] = peak
    metrics["slo"] = core.slo
    span = max((r.finish for r in records), default=0.0)
    metrics["stage_busy_fraction"] = busy / (P * span) if span else 0.0
    return SimResult(metrics, records, peak, core.iteration, core.slo, job_iterations)
