"""Discrete-event simulator: drives the very same SchedulerCore as the
scheduler service, with iteration times from the cost model and KV copies that
take bytes / bandwidth on their own link (one per direction), overlapping compute."""
from __future__ import annotations

import heapq
from dataclasses import dataclass, field

from fastserve.kvstore.placement import make_kv_policy

from .config import SchedulerCoreConfig
from .core import SchedulerCore
from .cost_model import CostModel
from .metrics import JobRecord, summarize
from .types import IterationResult, JobSpec
from .workload import MAX_TOTAL, TraceJob

UNLIMITED_BLOCKS = 1 << 20


@dataclass
class SimConfig:
    policy: str = "sj-mlfq"
    kv_policy: str = "proactive"
    gpu_kv_blocks: int | None = None  # None: unconstrained
    host_kv_blocks: int | None = None  # None: 4x the GPU pool
    copy_bandwidth: float = 16e9  # bytes/s per direction (PCIe 4 x16-ish)
    watermark: float = 0.05
    reserve: float = 0.10
    core: dict = field(default_factory=dict)  # extra SchedulerCoreConfig fields


@dataclass
class SimResult:
    metrics: dict
    records: list[JobRecord]
    peak_gpu_blocks: int
    iterations: int
    slo: float


def build_core(cfg: SimConfig, cost: CostModel) -> SchedulerCore:
    gpu = cfg.gpu_kv_blocks or UNLIMITED_BLOCKS
    host = cfg.host_kv_blocks if cfg.host_kv_blocks is not None else 4 * gpu
    core_cfg = SchedulerCoreConfig(policy=cfg.policy, block_size=cost.block_size, num_gpu_blocks=gpu,
                                   num_host_blocks=host, max_model_len=MAX_TOTAL, **cfg.core)
    return SchedulerCore(core_cfg, cost, make_kv_policy(cfg.kv_policy, watermark=cfg.watermark, reserve=cfg.reserve))


def simulate(jobs: list[TraceJob], cfg: SimConfig, cost: CostModel) -> SimResult:
    core = build_core(cfg, cost)
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
            assert len(e.block_table) * core.config.block_size >= e.num_computed + e.num_new_tokens
        elapsed = cost.iteration_time(d.batch)
        t += elapsed
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
    return SimResult(metrics, records, peak, core.iteration, core.slo)
