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
    # A replica split over P pipeline stages (scheduler/sim/pipeline.py):
    # each stage takes 1/P of a batch's time, activations take
    # `stage_transfer` seconds per hop, up to P batches are in the pipe.
    pipeline_parallel_size: int = 1
    stage_transfer: float = 0.0
    # Seconds between samples of the jobs in each level (SimResult.occupancy); None: no samples.
    occupancy_every: float | None = None
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
    occupancy: list[tuple[float, list[int]]] = field(default_factory=list)  # (time, jobs per level)


def build_core(cfg: SimConfig, cost: CostModel) -> SchedulerCore:
    """`cost`: the model the scheduler decides with (not necessarily the one timing the iterations)."""
    gpu = cfg.gpu_kv_blocks or UNLIMITED_BLOCKS
    host = cfg.host_kv_blocks if cfg.host_kv_blocks is not None else 4 * gpu
    P = cfg.pipeline_parallel_size
    options = dict(cfg.core, reschedule_gap=P) if P > 1 else cfg.core
    core_cfg = SchedulerCoreConfig(policy=cfg.policy, block_size=cost.block_size, num_gpu_blocks=gpu,
                                   num_host_blocks=host, max_model_len=MAX_TOTAL, **options)
    return SchedulerCore(core_cfg, cost, make_kv_policy(cfg.kv_policy, watermark=cfg.watermark, reserve=cfg.reserve))


class Trace:
    """The workload's side of a simulation, shared by the one-worker loop and
    the pipeline's (pipeline.py): arrivals, KV copies on their links (one per
    direction, overlapping compute), and each job's tokens until its output
    length (the simulator knows it; the scheduler does not)."""

    def __init__(self, jobs: list[TraceJob]) -> None:
        self.pending = sorted(jobs, key=lambda j: j.arrival_time)
        self.nxt = 0
        self.out_len: dict[str, int] = {}
        self.generated: dict[str, int] = {}
        self.arrival: dict[str, float] = {}
        self.first: dict[str, float] = {}
        self.joined: dict[str, int] = {}
        self.records: list[JobRecord] = []
        self.copies: list[tuple[float, int, str]] = []  # (done_at, move_id, job_id)
        self.link_free = {"offload": 0.0, "upload": 0.0}

    @property
    def arrivals_left(self) -> bool:
        return self.nxt < len(self.pending)

    def admit(self, core, t: float) -> None:
        while self.nxt < len(self.pending) and self.pending[self.nxt].arrival_time <= t:
            j = self.pending[self.nxt]
            jid = f"j{self.nxt}"
            core.add_job(JobSpec(jid, j.arrival_time, j.input_len, j.output_len, j.output_len), j.arrival_time)
            self.out_len[jid], self.generated[jid], self.arrival[jid] = j.output_len, 0, j.arrival_time
            self.joined[jid] = core.job_level(jid)
            self.nxt += 1

    def land_copies(self, core, t: float) -> list[str]:
        """Report the copies done by `t`; the jobs they moved."""
        landed = []
        while self.copies and self.copies[0][0] <= t:
            _, move_id, jid = heapq.heappop(self.copies)
            core.copy_done(jid, move_id, t)
            landed.append(jid)
        return landed

    def start_moves(self, d, t: float, cost: CostModel, bandwidth: float) -> None:
        for mv in d.offloads + d.uploads:
            start = max(t, self.link_free[mv.direction])
            self.link_free[mv.direction] = start + cost.copy_time(len(mv.gpu_blocks), bandwidth)
            heapq.heappush(self.copies, (self.link_free[mv.direction], mv.move_id, mv.job_id))

    def token(self, jid: str, t: float) -> bool:
        """A job produced a token at `t`; True when that was its last."""
        self.generated[jid] += 1
        assert self.generated[jid] <= self.out_len[jid], f"{jid} ran past its output"
        if self.generated[jid] == 1:
            self.first[jid] = t
        if self.generated[jid] < self.out_len[jid]:
            return False
        self.records.append(JobRecord(jid, self.arrival[jid], self.first[jid], t, 0, self.out_len[jid],
                                      self.joined[jid]))
        return True

    def next_events(self) -> list[float]:
        """The next copy to land and the next arrival, if any."""
        return [c[0] for c in self.copies[:1]] + ([self.pending[self.nxt].arrival_time] if self.arrivals_left else [])


def simulate(jobs: list[TraceJob], cfg: SimConfig, cost: CostModel,
             policy_cost: CostModel | None = None,
             prepare: Callable[[SchedulerCore], None] | None = None) -> SimResult:
    """`cost` times the iterations and copies; `policy_cost` (default: `cost`)
    is the scheduler's own model, as the service builds it from its profile.
    `prepare(core)` runs before the first job (e.g. to pre-train a policy)."""
    if cfg.pipeline_parallel_size > 1:
        from fastserve.scheduler.sim.pipeline import simulate_pipeline

        return simulate_pipeline(jobs, cfg, cost, policy_cost, prepare)
    if cfg.control_overhead < 0:
        raise ValueError(f"control_overhead must be >= 0, got {cfg.control_overhead}")
    core = build_core(cfg, policy_cost or cost)
    if prepare is not None:
        prepare(core)
    slow_at = [a for a, _ in cfg.slowdown or []]
    slow_f = [f for _, f in cfg.slowdown or []]
    if slow_at != sorted(slow_at) or any(f <= 0 for f in slow_f):
        raise ValueError("slowdown must be (start, factor > 0) steps sorted by start")
    tr = Trace(jobs)
    moving: set[str] = set()
    job_iterations: dict[str, list[int]] = {}
    t = 0.0
    peak = 0
    occupancy: list[tuple[float, list[int]]] = []
    next_sample = 0.0
    while tr.arrivals_left or core.num_jobs:
        if cfg.occupancy_every and t >= next_sample:
            occupancy.append((t, core.queue_lengths()))
            next_sample = t + cfg.occupancy_every
        tr.admit(core, t)
        for jid in tr.land_copies(core, t):
            moving.discard(jid)
        d = core.schedule(t)
        for mv in d.offloads + d.uploads:
            assert mv.job_id not in moving, f"{mv.job_id} moved twice at once"
            moving.add(mv.job_id)
        tr.start_moves(d, t, cost, cfg.copy_bandwidth)
        peak = max(peak, core.gpu_blocks_used())
        if not d.batch:
            core.update(IterationResult(d.iteration, 0.0, []), t)
            nexts = tr.next_events()
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
        finished = [e.job_id for e in d.batch if e.sample and tr.token(e.job_id, t)]
        core.update(IterationResult(d.iteration, elapsed, finished), t)
    records, pending = tr.records, tr.pending
    assert len(records) == len(pending), f"{len(pending) - len(records)} jobs lost"
    assert core.gpu_blocks_used() == 0 and core.host_blocks_used() == 0, "KV blocks leaked"
    metrics = summarize(records, core.stats.as_dict(), len(core.join_histogram))
    metrics["peak_gpu_blocks"] = peak
    metrics["slo"] = core.slo
    return SimResult(metrics, records, peak, core.iteration, core.slo, job_iterations, occupancy)
