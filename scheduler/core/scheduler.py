"""SchedulerCore: the pure, synchronous scheduler that the scheduler service,
the simulator, the offline LLM and the benchmark all drive.

Protocol: add_job() as jobs arrive; each iteration schedule(now) -> decision,
the caller runs the batch (and starts the KV moves it lists), then
update(IterationResult) once per decision and copy_done() for every move
that ended.

Asynchronous iterations: schedule() may be called again before the previous
decision's update() arrives. A job whose iteration is still in flight may be
in the next batch too (once `reschedule_gap` iterations have passed since it
last ran: 1 on one worker, the number of pipeline stages on a pipeline): it
continues where the iteration in flight ends, and the worker feeds it the
token that iteration samples. A job is never moved or freed while an
iteration or a copy uses its blocks. update()s of one job arrive in order.
"""
from __future__ import annotations

import bisect
import math
from collections import OrderedDict
from dataclasses import asdict, dataclass

from fastserve.scheduler.core.config import SchedulerCoreConfig
from fastserve.scheduler.core.cost_model import CostModel
from fastserve.scheduler.core.enst import work_ahead_by_level
from fastserve.scheduler.core.job import Job, Loc
from fastserve.scheduler.core.kv_manager import KVManager
from fastserve.scheduler.core.levels import Level
from fastserve.scheduler.core.placement import Cand, KVPlacementPolicy, PlacementPlan, PlacementView
from fastserve.scheduler.core.policies import make_policy
from fastserve.scheduler.core.snapshot import MAX_JOBS, build_snapshot
from fastserve.scheduler.core.types import BatchEntry, IterationResult, JobSpec, KVMove, ScheduleDecision

__all__ = ["SchedulerCore", "SchedulerCoreConfig", "SchedulerStats"]


@dataclass
class SchedulerStats:
    preemptions: int = 0
    demotions: int = 0
    promotions: int = 0
    swaps: int = 0  # offloads + uploads
    offloads: int = 0
    uploads: int = 0
    drops: int = 0
    finished: int = 0
    cancelled: int = 0
    recomputed: int = 0  # jobs that lost their KV with a worker or the KV store

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


@dataclass
class _Walk:
    batch: list[tuple[Job, int]]  # (job, new tokens)
    blocked: list[tuple[Job, int]]  # (job, blocks needed)
    want_upload: list[Job]
    popped: list[Job]  # never-run jobs popped from their heap for this batch
    free: int  # GPU blocks left after the batch


class SchedulerCore:
    def __init__(self, config: SchedulerCoreConfig, cost_model: CostModel, kv_policy: KVPlacementPolicy) -> None:
        self.config = config
        self.cost_model = cost_model
        self.kv_policy = kv_policy
        c = config
        self.base_quantum = c.base_quantum or cost_model.decode_time(c.typical_batch, c.typical_context)
        self.slo = c.slo_factor * self.base_quantum
        self.policy = make_policy(c.policy, cost_model=cost_model, base_quantum=self.base_quantum,
                                  num_queues=c.num_queues, quantum_ratio=c.quantum_ratio,
                                  max_batch_size=c.max_batch_size, max_model_len=c.max_model_len)
        self.starvation_threshold = ((c.starvation_threshold or c.starvation_slo_factor * self.slo)
                                     * self.policy.starvation_patience)
        n = self.policy.num_levels
        # Batch work (priority > 0) waits in one more level below every level
        # of the policy: it runs only on capacity the interactive jobs leave,
        # FCFS, never demoted nor promoted, and its KV is the first to move out.
        self.background = n
        n += 1
        # ENST needs finite quanta even where the policy never demotes.
        self._qf = [self.base_quantum * c.quantum_ratio ** i for i in range(n)]
        self._levels = [Level() for _ in range(n)]
        self.kv = KVManager(c.num_gpu_blocks, c.num_host_blocks, c.block_size, kv_policy.reserve_full_length)
        self._jobs: dict[str, Job] = {}
        self._starve: OrderedDict[str, Job] = OrderedDict()  # least recently run first
        self._seq = 0
        self._iteration = 0
        self._outstanding: dict[int, list[BatchEntry]] = {}
        self._last_batch: set[str] = set()
        self.stats = SchedulerStats()
        self.join_histogram = [0] * n

    # ------------------------------------------------------------------ jobs
    def add_job(self, spec: JobSpec, now: float) -> None:
        if spec.job_id in self._jobs:
            raise ValueError(f"job {spec.job_id} already added")
        total = spec.input_len + spec.max_tokens
        if total > self.config.max_model_len:
            raise ValueError(f"job {spec.job_id}: input_len + max_tokens = {total} exceeds "
                             f"max_model_len {self.config.max_model_len}")
        if self.kv.blocks(total) > self.config.num_gpu_blocks:
            raise ValueError(f"job {spec.job_id}: needs {self.kv.blocks(total)} KV blocks, the GPU pool has "
                             f"{self.config.num_gpu_blocks}")
        job = Job(spec, self.background if spec.priority > 0 else self.policy.join_level(spec.input_len), now)
        self._set_key(job)
        self._jobs[spec.job_id] = job
        self._levels[job.level].add(job)
        if job.level != self.background:  # batch work is neither learned from nor promoted
            self.policy.arrive(job, now)
            self._starve[spec.job_id] = job
        self.join_histogram[job.level] += 1

    def cancel(self, job_id: str) -> None:
        """Forget a job and free its blocks. Blocks that an outstanding
        iteration or copy still uses are freed when that settles. Idempotent."""
        job = self._jobs.get(job_id)
        if job is None or job.cancelled:
            return
        self.stats.cancelled += 1
        self._retire(job)

    # ------------------------------------------------------------ iteration
    def schedule(self, now: float) -> ScheduleDecision:
        self._iteration += 1
        it = self._iteration
        if self.policy.starvation:
            self._promote(now)
        walk = self._walk()
        plan = PlacementPlan()
        if walk.blocked or walk.want_upload or not self.kv_policy.reserve_full_length:
            plan = self.kv_policy.plan(self._view(walk, now))
        offloads, dropped = self._evict(plan)
        in_batch = {j.id for j, _ in walk.batch}
        if dropped or any(jid in in_batch for jid in plan.offload):
            for job in walk.popped:  # re-walk with the freed blocks
                self._levels[job.level].push_back(job)
            walk = self._walk()
        batch = [self._commit(job, n, it) for job, n in walk.batch]
        uploads = self._uploads(plan.upload)
        ids = {e.job_id for e in batch}
        # Preempted: in the last batch, could run in this one, and was left out. With asynchronous
        # iterations a job of the last batch is still in flight here, yet runnable (its token in flight
        # is fed to it by the worker), so "runnable", not "not in flight", is the test.
        preempted = [jid for jid in self._last_batch if jid not in ids and jid in self._jobs
                     and not self._jobs[jid].cancelled and self._runnable(self._jobs[jid])]
        self.stats.preemptions += len(preempted)
        self._last_batch = ids
        self._outstanding[it] = batch
        return ScheduleDecision(it, batch, offloads, uploads, dropped, preempted)

    def update(self, result: IterationResult, now: float) -> None:
        """Apply the outcome of an iteration (`result.finished`: the jobs whose
        last token came out of it)."""
        batch = self._outstanding.pop(result.iteration, None)
        if batch is None:
            raise ValueError(f"update for iteration {result.iteration}, which is not outstanding")
        if result.elapsed < 0:
            raise ValueError(f"negative elapsed time {result.elapsed}")
        for e in batch:
            job = self._jobs.get(e.job_id)
            if job is None:
                continue
            job.in_flight -= 1
            assert job.in_flight >= 0
            if e.sample:
                job.pending_samples -= 1
            if job.cancelled:
                self._maybe_release(job)
                continue
            job.num_computed += e.num_new_tokens
            if e.sample:
                job.num_generated += 1
            self._charge(job, result.elapsed, now)
        for jid in result.finished:
            job = self._jobs.get(jid)
            if job is not None and not job.cancelled:
                self.stats.finished += 1
                if job.level != self.background:
                    self.policy.observe(job)
                self._retire(job)

    def copy_done(self, job_id: str, move_id: int, now: float, ok: bool = True) -> bool:
        """A move ended (ok=False: it failed). False for a report that is not
        about the job's current move (stale, or the job is gone)."""
        job = self._jobs.get(job_id)
        if job is None:
            return False
        if not self.kv.copy_done(job, move_id, ok):
            return False
        if job.loc is Loc.NONE:
            self._requeue_for_recompute(job)
        if job.cancelled:
            self._maybe_release(job)
        return True

    def lose_gpu_kv(self) -> list[str]:
        """The worker and its KV cache are gone: every iteration in flight is
        abandoned, jobs whose KV was on the GPU go on by recompute (prefill of
        prompt + tokens so far). Returns their ids."""
        self._abandon_outstanding()
        lost = self.kv.lose_gpu()
        for job in lost:
            self._requeue_for_recompute(job)
        self.stats.recomputed += len(lost)
        self._last_batch.clear()
        self._release_settled()
        return [j.id for j in lost]

    def lose_host_kv(self) -> list[str]:
        """The KV store and its host pool are gone: swapped-out jobs go on by recompute."""
        lost = self.kv.lose_host()
        for job in lost:
            self._requeue_for_recompute(job)
        self.stats.recomputed += len(lost)
        self._release_settled()
        return [j.id for j in lost]

    def set_host_capacity(self, num_blocks: int) -> None:
        """Host blocks the KV store offers (0 while there is no KV store)."""
        self.kv.set_host_capacity(num_blocks)

    # ----------------------------------------------------------- inspection
    @property
    def iteration(self) -> int:
        return self._iteration

    def has_job(self, job_id: str) -> bool:
        job = self._jobs.get(job_id)
        return job is not None and not job.cancelled

    def job_level(self, job_id: str) -> int:
        return self._jobs[job_id].level

    def job_location(self, job_id: str) -> str:
        return self._jobs[job_id].loc.value

    @property
    def num_running(self) -> int:
        return len(self._last_batch)

    @property
    def num_swapped(self) -> int:
        return self.kv.num_swapped()

    @property
    def num_waiting(self) -> int:
        return self.num_jobs - self.num_running - self.num_swapped

    @property
    def num_jobs(self) -> int:
        return sum(len(lv) for lv in self._levels)

    @property
    def num_outstanding(self) -> int:
        return len(self._outstanding)

    def queue_lengths(self) -> list[int]:
        return [len(lv) for lv in self._levels]

    def gpu_blocks_used(self) -> int:
        return self.kv.gpu.num_used

    def host_blocks_used(self) -> int:
        return self.kv.host_used

    def snapshot(self, max_jobs: int = MAX_JOBS):
        """A bounded picture of the levels and the KV for people (scheduler/core/snapshot.py)."""
        running = [self._jobs[j] for j in self._last_batch if j in self._jobs]
        quanta = (*self.policy.quanta, math.inf)  # the batch level: never demoted out
        return build_snapshot(self._levels, quanta, running, self.kv, self.stats,
                              sum(self.join_histogram), self._iteration, self.slo, max_jobs)

    # ------------------------------------------------------------ internals
    def _set_key(self, job: Job) -> None:
        self._seq += 1
        job.seq = self._seq
        # The batch level is first come, first served, whatever the policy.
        job.key = (job.seq,) if job.level == self.background else self.policy.key(job)

    def _reprioritize(self, job: Job, level: int, key: tuple[int, ...]) -> None:
        self.kv.unrank(job)
        self._levels[job.level].remove(job)
        job.level = level
        job.key = key
        self._levels[level].add(job)
        self.kv.rerank(job)

    def _move(self, job: Job, level: int) -> None:
        charge = job.charge
        job.charge = 0.0
        self._levels[job.level].charge_sum -= charge  # remove() below then takes off 0
        self._seq += 1
        job.seq = self._seq
        self._reprioritize(job, level, self.policy.key(job))

    def _charge(self, job: Job, elapsed: float, now: float) -> None:
        if job.level == self.background:
            return
        lv = self._levels[job.level]
        job.charge += elapsed
        lv.charge_sum += elapsed
        job.starve_clock = now
        self._starve.move_to_end(job.id)
        if job.charge > self.policy.quanta[job.level] and job.level + 1 < len(self._levels):
            self.stats.demotions += 1
            self._move(job, job.level + 1)
        elif self.policy.rekey:
            key = self.policy.key(job)
            if key != job.key:
                self._reprioritize(job, job.level, key)

    def _promote(self, now: float) -> None:
        limit = self.config.max_promotions_per_iteration
        threshold = self.starvation_threshold
        starve = self._starve
        while starve and limit > 0:
            job = next(iter(starve.values()))
            if now - job.starve_clock < threshold:
                break
            limit -= 1
            job.starve_clock = now
            starve.move_to_end(job.id)
            if job.level != 0 and not job.in_flight:
                self.stats.promotions += 1
                self._move(job, 0)

    def _runnable(self, job: Job) -> bool:
        """May `job` be in the next batch, given the iterations it has in flight?"""
        if not job.in_flight:
            return True
        return (self._iteration - job.last_iteration >= self.config.reschedule_gap
                and job.can_sample_more and job.known_tokens > job.num_scheduled)

    def _take(self, job: Job, tokens_left: int, free: int) -> tuple[int, int]:
        """(new tokens, blocks needed) for `job` in this batch."""
        n = min(job.known_tokens - job.num_scheduled, tokens_left)
        return n, self.kv.need(job, job.num_scheduled + n)

    def _walk(self) -> _Walk:
        """Read the levels in priority order and pick this iteration's batch
        without allocating: the highest-priority ready jobs, up to the batch
        size, the token budget and the free blocks. Stops when the batch is full.
        Jobs that lack blocks are collected (for the placement policy to make
        room for) only while batch + blocked fit in a batch: room for more
        jobs than can run is room nobody uses."""
        cfg = self.config
        kv = self.kv
        free = kv.num_free
        reserve_mode = kv.reserve_full_length
        unreserved = cfg.num_gpu_blocks - kv.reserved
        tokens_left = cfg.max_tokens_per_batch
        max_b = cfg.max_batch_size
        admit_open = True
        waiting = sum(lv.num_fresh for lv in self._levels[:self.background])  # interactive; O(levels)
        # Jobs that cannot run (blocked, swapped, busy) are looked at up to a
        # budget, so memory pressure cannot make one iteration scan every job.
        budget = cfg.max_candidates
        examined = 0
        w = _Walk([], [], [], [], 0)
        for li, lv in enumerate(self._levels):
            keys, jobs = lv.keys, lv.jobs
            i, n_started = 0, len(jobs)
            while len(w.batch) < max_b and tokens_left > 0:
                fresh = lv.peek_fresh(li) if admit_open else None
                if i < n_started and (fresh is None or keys[i] < fresh.key):
                    job = jobs[i]
                    i += 1
                elif fresh is not None:
                    job = fresh
                else:
                    break
                if examined - len(w.batch) >= budget:
                    break
                examined += 1
                if job.cancelled or not self._runnable(job):
                    continue
                loc = job.loc
                if loc is Loc.GPU:
                    n, need = self._take(job, tokens_left, free)
                    if n > 1 and self.policy.defer_prefill(job, n, w.batch, waiting):
                        continue  # the rest of a prefill, held back by the policy
                    if need <= free:
                        w.batch.append((job, n))
                        free -= need
                        tokens_left -= n
                    elif len(w.batch) + len(w.blocked) < max_b:
                        w.blocked.append((job, need))
                elif loc is Loc.NONE:
                    if not admit_open:
                        continue
                    n, need = self._take(job, tokens_left, free)
                    if self.policy.defer_prefill(job, n, w.batch, waiting):
                        admit_open = False  # the prefills behind it wait too
                        continue
                    full = kv.blocks(job.spec.input_len + job.spec.max_tokens)
                    if need <= free and (not reserve_mode or full <= unreserved):
                        if not job.started:
                            lv.pop_fresh()
                            w.popped.append(job)
                        w.batch.append((job, n))
                        free -= need
                        tokens_left -= n
                        if reserve_mode:
                            unreserved -= full
                    else:
                        # New work waits for memory; running jobs go on.
                        admit_open = False
                        if len(w.batch) + len(w.blocked) < max_b:
                            w.blocked.append((job, need))
                elif loc is Loc.HOST and len(w.batch) + len(w.want_upload) < max_b:
                    w.want_upload.append(job)
            if len(w.batch) >= max_b or tokens_left <= 0 or examined - len(w.batch) >= budget:
                break
        if examined - len(w.batch) >= budget:
            self._walk_resident(w, free, tokens_left)
        else:
            w.free = free
        return w

    def _walk_resident(self, w: _Walk, free: int, tokens_left: int) -> None:
        """Progress guarantee: the budget ran out on jobs that cannot run
        (swapped, copying, waiting for memory), yet jobs whose KV is on the
        GPU may be behind them. Left idle, their blocks would be evicted for
        the very jobs that cannot run, and no batch would ever run. Bounded
        by memory, not by the number of waiting jobs; adds no more blocked
        jobs than the budget allows."""
        max_b = self.config.max_batch_size
        batch, blocked = w.batch, w.blocked
        taken = {j.id for j, _ in batch}
        for job in self.kv.ranked[Loc.GPU].highest_first():
            if len(batch) >= max_b or tokens_left <= 0:
                break
            # Most resident jobs are not in flight (runnable): _runnable() only for those that are,
            # as this loop runs over hundreds of jobs in most iterations under memory pressure.
            if job.cancelled or job.id in taken or (job.in_flight and not self._runnable(job)):
                continue
            n, need = self._take(job, tokens_left, free)
            if n <= 0:
                continue
            if need <= free:
                batch.append((job, n))
                free -= need
                tokens_left -= n
            elif len(batch) + len(blocked) < max_b:
                blocked.append((job, need))
        w.free = free

    def _commit(self, job: Job, n: int, it: int) -> BatchEntry:
        if not job.started:
            self._levels[job.level].start(job)
        kv = self.kv
        kv.landed.discard(job.id)
        if job.loc is Loc.NONE:
            kv.admit(job, job.spec.input_len + job.spec.max_tokens)
        start = job.num_scheduled
        kv.grow(job, start + n)
        known = job.known_tokens
        sample = start + n == known
        is_prefill = start < job.spec.input_len or known - start > 1
        job.in_flight += 1
        job.num_scheduled = start + n
        job.last_iteration = it
        if sample:
            job.pending_samples += 1
        return BatchEntry(job.id, is_prefill, n, start, list(job.gpu_blocks), sample=sample)

    # ------------------------------------------------------------ KV placement
    def _enst_base(self) -> list[float]:
        lv = self._levels
        return work_ahead_by_level([len(x) for x in lv], [x.charge_sum for x in lv], self._qf)

    def _enst_function(self, base: list[float], now: float):
        """ENST of a job (scheduler/core/enst.py: the same formula, inlined
        with this iteration's constants, as it runs for every placement candidate)."""
        levels, qf, bsz = self._levels, self._qf, self.config.max_batch_size
        starving = self.policy.starvation
        threshold = self.starvation_threshold
        background = self.background
        bisect_left = bisect.bisect_left

        def enst_of(job: Job) -> float:
            lv = job.level
            work = (base[lv] + bisect_left(levels[lv].keys, job.key) * qf[lv]) / bsz
            if starving and lv != background:
                starve = threshold - (now - job.starve_clock)
                return min(work, starve if starve > 0.0 else 0.0)
            return work
        return enst_of

    def _view(self, w: _Walk, now: float) -> PlacementView:
        base = self._enst_base()
        in_batch = {j.id for j, _ in w.batch}
        kv = self.kv
        limit = self.config.max_candidates
        enst_of = self._enst_function(base, now)

        def resident() -> list[Cand]:
            """The `limit` lowest-priority idle resident jobs: offload and drop
            victims come from there. O(limit + jobs in flight)."""
            out: list[Cand] = []
            for j in kv.ranked[Loc.GPU].lowest_first():
                if len(out) >= limit:
                    break
                if not j.in_flight and not j.cancelled:
                    out.append(Cand(j.id, len(j.gpu_blocks), enst_of(j), j.id in in_batch,
                                    rank=(j.level, j.key), landed=j.id in kv.landed))
            return out

        def swapped() -> list[Cand]:
            """The `limit` highest-priority swapped-out jobs: upload candidates."""
            out: list[Cand] = []
            for j in kv.ranked[Loc.HOST].highest_first():
                if len(out) >= limit:
                    break
                if not j.cancelled:
                    out.append(Cand(j.id, j.host_blocks, enst_of(j), rank=(j.level, j.key)))
            return out

        return PlacementView(
            num_gpu_blocks=kv.num_gpu_blocks, free_gpu=w.free, pending_free_gpu=kv.pending_free,
            free_host=kv.host_free, host_used=kv.host_used,
            blocked=[Cand(j.id, need, enst_of(j), admission=not j.started, rank=(j.level, j.key))
                     for j, need in w.blocked],
            want_upload=[Cand(j.id, j.host_blocks, enst_of(j), rank=(j.level, j.key)) for j in w.want_upload],
            resident=resident, swapped=swapped)

    def _evict(self, plan: PlacementPlan) -> tuple[list[KVMove], list[str]]:
        offloads = []
        for jid in plan.offload:
            move = self.kv.offload(self._jobs[jid])
            if move is not None:  # else the policy over-booked the host: the job simply stays
                offloads.append(move)
        dropped = []
        for jid in plan.drop:
            job = self._jobs[jid]
            self.kv.drop(job)
            self._requeue_for_recompute(job)
            dropped.append(jid)
        self.stats.offloads += len(offloads)
        self.stats.swaps += len(offloads)
        self.stats.drops += len(dropped)
        return offloads, dropped

    def _uploads(self, job_ids: list[str]) -> list[KVMove]:
        moves = []
        for jid in job_ids:
            job = self._jobs[jid]
            if job.loc is not Loc.HOST or job.in_flight:
                continue
            move = self.kv.upload(job)
            if move is not None:  # else the batch took the blocks after all; ask again next iteration
                moves.append(move)
        self.stats.uploads += len(moves)
        self.stats.swaps += len(moves)
        return moves

    def _requeue_for_recompute(self, job: Job) -> None:
        """A job whose KV is gone goes back among the jobs without KV, at its
        old place in its queue: it is re-admitted like a new job (prefill of
        prompt + tokens so far) and never costs anyone's KV."""
        job.num_computed = job.num_scheduled = 0
        if job.cancelled:
            return
        lv = self._levels[job.level]
        lv.remove(job)
        job.started = False
        lv.add(job)

    def _abandon_outstanding(self) -> None:
        """Iterations whose results will never come: their jobs go on from
        where those iterations started."""
        for batch in self._outstanding.values():
            for e in batch:
                job = self._jobs.get(e.job_id)
                if job is None:
                    continue
                job.in_flight -= 1
                if e.sample:
                    job.pending_samples -= 1
        self._outstanding.clear()
        for job in self._jobs.values():
            job.num_scheduled = job.num_computed

    def _release_settled(self) -> None:
        for job in [j for j in self._jobs.values() if j.cancelled]:
            self._maybe_release(job)

    def _retire(self, job: Job) -> None:
        self._levels[job.level].remove(job)
        self._starve.pop(job.id, None)
        self._last_batch.discard(job.id)
        job.cancelled = True
        job.level = -1
        self._maybe_release(job)

    def _maybe_release(self, job: Job) -> None:
        if self.kv.busy(job):
            return  # an iteration or a copy still uses its blocks
        self.kv.release(job)
        del self._jobs[job.id]
