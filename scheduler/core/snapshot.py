"""A bounded picture of the scheduler core for people (the dashboard,
`fastserve top`): every level with its quantum and its first jobs in priority
order, where each job's KV is, the KV pools and the cumulative counters.

It is built a few times a second while the core serves, so its cost depends
on the number of jobs shown (`max_jobs`), never on the number waiting:
started jobs are read from each level's sorted list, never-run jobs from the
top of its heap (the k smallest entries of a heap, in order, without popping:
O(k log k)), and stale heap entries are skipped up to a budget of 2k + 32.
"""
from __future__ import annotations

import heapq
import math
from collections.abc import Collection, Sequence

from fastserve.common.schemas import CoreSnapshot, SnapshotCounters, SnapshotJob, SnapshotKV, SnapshotLevel
from fastserve.scheduler.core.job import Job, Loc
from fastserve.scheduler.core.kv_manager import KVManager
from fastserve.scheduler.core.levels import Level

MAX_JOBS = 256  # per replica, besides the jobs of the latest batch

_MOVING = (Loc.TO_HOST, Loc.TO_GPU)


def build_snapshot(levels: Sequence[Level], quanta: Sequence[float], running: Collection[Job], kv: KVManager,
                   stats, admitted: int, iteration: int, slo: float, max_jobs: int = MAX_JOBS) -> CoreSnapshot:
    """`running`: the jobs of the latest batch (always listed); `stats`: the
    core's SchedulerStats; `admitted`: jobs added so far."""
    sizes = [len(lv) for lv in levels]
    quota = _shares(sizes, max_jobs)
    running_ids = {j.id for j in running}
    views = []
    for i, lv in enumerate(levels):
        jobs = _first_jobs(lv, i, quota[i])
        listed = {j.id for j in jobs}
        jobs += [j for j in running if j.level == i and j.id not in listed]
        views.append(SnapshotLevel(level=i, quantum=None if math.isinf(quanta[i]) else quanta[i], num_jobs=sizes[i],
                                   more=max(sizes[i] - len(jobs), 0), jobs=[_job(j, running_ids) for j in jobs]))
    kv_view = SnapshotKV(gpu_used=kv.gpu.num_used, gpu_total=kv.num_gpu_blocks, host_used=kv.host_used,
                         host_total=kv.host_capacity, offloading=len(kv.by_loc[Loc.TO_HOST]),
                         uploading=len(kv.by_loc[Loc.TO_GPU]))
    return CoreSnapshot(iteration=iteration, slo=slo, num_jobs=sum(sizes), num_running=len(running_ids),
                        levels=views, kv=kv_view, counters=SnapshotCounters(
                            admitted=admitted, finished=stats.finished, cancelled=stats.cancelled,
                            preemptions=stats.preemptions, demotions=stats.demotions, promotions=stats.promotions,
                            offloads=stats.offloads, uploads=stats.uploads, drops=stats.drops))


def job_state(job: Job, running: Collection[str]) -> str:
    if job.loc is Loc.HOST:
        return "host"
    if job.loc in _MOVING:
        return "moving"
    if job.id in running:
        return "running"
    if job.in_flight:
        return "in_flight"
    return "waiting"


def _job(job: Job, running: Collection[str]) -> SnapshotJob:
    return SnapshotJob(job_id=job.id, level=job.level, state=job_state(job, running), kv=job.loc.value,
                       generated=job.num_generated, charge=job.charge, join_level=job.join_level,
                       prompt_len=job.spec.input_len)


def _shares(sizes: list[int], total: int) -> list[int]:
    """Split `total` list places among the levels: each level gets an equal
    share, and what a small level does not use goes to the larger ones."""
    quota = [0] * len(sizes)
    left = total
    order = sorted(range(len(sizes)), key=sizes.__getitem__)
    for rank, i in enumerate(order):
        quota[i] = min(sizes[i], left // (len(sizes) - rank))
        left -= quota[i]
    return quota


def _first_jobs(lv: Level, index: int, k: int) -> list[Job]:
    """The first `k` jobs of a level in key order: started ones and never-run ones merged."""
    if k <= 0:
        return []
    started = lv.jobs[:k]
    fresh = _first_fresh(lv, index, k)
    out: list[Job] = []
    a = b = 0
    while len(out) < k and (a < len(started) or b < len(fresh)):
        if b >= len(fresh) or (a < len(started) and started[a].key < fresh[b].key):
            out.append(started[a])
            a += 1
        else:
            out.append(fresh[b])
            b += 1
    return out


def _first_fresh(lv: Level, index: int, k: int) -> list[Job]:
    """The `k` smallest valid entries of the level's heap, in order, without
    touching the heap: a walk of its tree from the root, always expanding
    the smallest entry seen. Stale entries are skipped, at most 2k + 32 of them."""
    heap = lv.fresh
    n = len(heap)
    out: list[Job] = []
    seen: set[str] = set()
    frontier = [(heap[0][0], heap[0][1], 0)] if heap else []
    budget = 3 * k + 32
    valid, push, pop = lv.valid_fresh, heapq.heappush, heapq.heappop
    while frontier and len(out) < k and budget > 0:
        _, _, i = pop(frontier)
        budget -= 1
        entry = heap[i]
        if valid(entry, index) and entry[1] not in seen:
            seen.add(entry[1])
            out.append(entry[2])
        c = 2 * i + 1
        if c < n:
            push(frontier, (heap[c][0], heap[c][1], c))
            if c + 1 < n:
                push(frontier, (heap[c + 1][0], heap[c + 1][1], c + 1))
    return out
