"""Discrete-event simulator: drives the very same SchedulerCore as the
scheduler service, with iteration times from the cost model and KV copies that
take bytes / bandwidth on their own link (one per direction), overlapping compute.

Two things are kept apart the way the serving loop keeps them apart:
- what the scheduler *believes* (its cost model: quanta, skip-join levels, SLO,
  starvation threshold; the service builds it from `--profile`) and what the
  iterations *cost* (the clock). `simulate(..., policy_cost=)` gives the first,
  `cost` the second; by default they are the same model.
- the engine's step and the loop's control overhead (bus, scheduler work)
  around it: the clock advances by both, but jobs are charged only the step,
  as the service charges the worker's measured `step_seconds`.
"""
from __future__ import annotations

import bisect
import heapq
from dataclasses import dataclass, field
from typing import Callable

from fastserve.scheduler.core.placement import make_kv_policy

from fastserve.scheduler.core.config import SchedulerCoreConfig
from fastserve.scheduler.core.scheduler import SchedulerCore
from fastserve.scheduler.core.cost_model import CostModel
from fastserve.scheduler.sim.metrics import JobRecord, summarize
from fastserve.scheduler.core.types import IterationResult, JobSpec
from fastserve.scheduler.sim.workload import MAX_TOTAL, TraceJob

UNLIMITED_BLOCKS = 1 << 20


@dataclass
class SimConfig:
    policy: str = "default"
    kv_policy: str = "proactive"
    gpu_kv_blocks: int | None = None  # None: unconstrained
    host_kv_blocks: int | None = None  # None: 4x the GPU pool
    copy_bandwidth: float = 16e9  # bytes/s per direction (PCIe 4 x16-ish)
    watermark: float = 0.05
    reserve: float = 0.10
    # Seconds per iteration that the serving loop adds to the engine's step
    # (scheduling, the bus): the clock pays it, the jobs' MLFQ charge does not.
    control_overhead: float = 0.0
    # Diagnostics: the machine's speed over time, as (start time, factor)
    # steps sorted by start; a step's cost is multiplied by the factor in
    # force when it starts. Replays a measured run's drift (a shared machine
    # slowing down) to tell it apart from modelling errors. None: constant.
    slowdown: list[tuple[float, float]] | None = None
    core: dict = field(default_factory=dict)  # extra SchedulerCoreConfig fields


@dataclass
class SimResult:
    metrics: dict
    records: list[JobRecord]
    peak_gpu_blocks: int
    iterations: int
    slo: float
    # job id -> [iterations it ran in, of which prefill]: compared with the real stack's.
    job_iterations: dict[str, list[int]] = field(default_factory=dict)


def build_core(cfg: SimConfig, cost: CostModel) -> SchedulerCore:
    """`cost`: the model the scheduler decides with (not necessarily the one timing the iterations)."""
    gpu = cfg.gpu_kv_blocks or UNLIMITED_BLOCKS
    host = cfg.host_kv_blocks if cfg.host_kv_blocks is not None else 4 * gpu
    core_cfg = SchedulerCoreConfig(policy=cfg.policy, block_size=cost.block_size, num_gpu_blocks=gpu,
                                   num_host_blocks=host, max_model_len=MAX_TOTAL, **cfg.core)
    return SchedulerCore(core_cfg, cost, make_kv_policy(cfg.kv_policy, watermark=cfg.watermark, reserve=cfg.reserve))


def simulate(jobs: list[TraceJob], cfg: SimConfig, cost: CostModel,
             policy_cost: CostModel | None = None,
             prepare: Callable[[SchedulerCore], None] | None = None) -> SimResult:
    """`cost` times the iterations and copies; `policy_cost` (default: `cost`)
    is the scheduler's own model, as the service builds it from its profile.
    `prepare(core)` runs before the first job (e.g. to pre-train a policy)."""
    if cfg.control_overhead < 0:
        raise ValueError(f"control_overhead must be >= 0, got {cfg.control_overhead}")
    core = build_core(cfg, policy_cost or cost)
    if prepare is not None:
        prepare(core)
    slow_at = [a for a, _ in cfg.slowdown or []]
    slow_f = [f for _, f in cfg.slowdown or []]
    if slow_at != sorted(slow_at) or any(f <= 0 for f in slow_f):
        raise ValueError("slowdown must be (start, factor > 0) steps sorted by start")
    pending = sorted(jobs, key=lambda j: j.arrival_time)
    out_len: dict[str, int] = {}
    generated: dict[str, int] = {}
    arrival: dict[str, float] = {}
    first: dict[str, float] = {}
    joined: dict[str, int] = {}
    records: list[JobRecord] = []
    copies: list[tuple[float, str, str]] = []  # (done_at, job_id, direction)
    moving: set[str] = set()
    link_free = {"offload": 0.0, "upload": 0.0}
    job_iterations: dict[str, list[int]] = {}
    t = 0.0
    nxt = 0
    peak = 0
    while nxt < len(pending) or core.num_jobs:
        while nxt < len(pending) and pending[nxt].arrival_time <= t:
            j = pending[nxt]
            jid = f"j{nxt}"
            core.add_job(JobSpec(jid, j.arrival_time, j.input_len, j.output_len, j.output_len), j.arrival_time)
            out_len[jid], generated[jid], arrival[jid] = j.output_len, 0, j.arrival_time
            joined[jid] = core.job_level(jid)
            nxt += 1
        while copies and copies[0][0] <= t:
            _, jid, direction = heapq.heappop(copies)
            moving.discard(jid)
            core.copy_done(jid, direction, t)
        d = core.schedule(t)
        for mv in d.offloads + d.uploads:
            assert mv.job_id not in moving, f"{mv.job_id} moved twice at once"
            start = max(t, link_free[mv.direction])
            link_free[mv.direction] = start + cost.copy_time(len(mv.src_blocks), cfg.copy_bandwidth)
            heapq.heappush(copies, (link_free[mv.direction], mv.job_id, mv.direction))
            moving.add(mv.job_id)
        peak = max(peak, core.gpu_blocks_used())
        if not d.batch:
            core.update(IterationResult(d.iteration, 0.0, []), t)
            nexts = [c[0] for c in copies[:1]] + [pending[nxt].arrival_time] if nxt < len(pending) else \
                [c[0] for c in copies[:1]]
            if not nexts:
                raise RuntimeError(f"simulation stalled at t={t:.3f}: {core.num_jobs} jobs left, nothing can run "
                                   f"(gpu blocks used {core.gpu_blocks_used()}/{core.config.num_gpu_blocks})")
            t = max(t, min(nexts))
            continue
        seen = set()
        for e in d.batch:
            assert e.job_id not in seen and e.job_id not in moving, f"{e.job_id} scheduled twice or while moving"
            seen.add(e.job_id)
            ran = job_iterations.setdefault(e.job_id, [0, 0])
            ran[0] += 1
            ran[1] += int(e.is_prefill)
            assert len(e.block_table) * core.config.block_size >= e.num_computed + e.num_new_tokens
        elapsed = cost.iteration_time(d.batch)  # the step: what the jobs are charged
        if slow_at:
            elapsed *= slow_f[max(bisect.bisect_right(slow_at, t) - 1, 0)]
        t += elapsed + cfg.control_overhead
        finished = []
        for e in d.batch:
            if not e.sample:
                continue
            jid = e.job_id
            generated[jid] += 1
            if generated[jid] == 1:
                first[jid] = t
            if generated[jid] == out_len[jid]:
                finished.append(jid)
                records.append(JobRecord(jid, arrival[jid], first[jid], t, 0, out_len[jid], joined[jid]))
            assert generated[jid] <= out_len[jid], f"{jid} ran past its output"
        core.update(IterationResult(d.iteration, elapsed, finished), t)
    assert len(records) == len(pending), f"{len(pending) - len(records)} jobs lost"
    assert core.gpu_blocks_used() == 0 and core.host_blocks_used() == 0, "KV blocks leaked"
    metrics = summarize(records, core.stats.as_dict(), len(core.join_histogram))
    metrics["peak_gpu_blocks"] = peak
    metrics["slo"] = core.slo
    return SimResult(metrics, records, peak, core.iteration, core.slo, job_iterations)
