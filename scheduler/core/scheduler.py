"""SchedulerCore: the pure, synchronous scheduler that the scheduler service,
the simulator and the benchmark all drive.

Protocol: add_job() as jobs arrive; each iteration schedule(now) -> decision,
the caller runs the batch (and starts the KV copies it lists), then
update(IterationResult) and copy_done() for every copy that finished.
Pipelining: schedule() may be called again before update(); jobs of batches
still outstanding are left out of the new batch and never moved or freed
until their update() arrives (one update per decision, any order).
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import asdict, dataclass

from fastserve.scheduler.core.placement import KVPlacementPolicy, PlacementPlan

from fastserve.scheduler.core.block_pool import BlockPool
from fastserve.scheduler.core.config import SchedulerCoreConfig
from fastserve.scheduler.core.cost_model import CostModel
from fastserve.scheduler.core.kv_manager import KVPlacementMixin
from fastserve.scheduler.core.job import Job, Loc
from fastserve.scheduler.core.levels import Level, PrioritySet
from fastserve.scheduler.core.policies import make_policy
from fastserve.scheduler.core.types import BatchEntry, IterationResult, JobSpec, ScheduleDecision

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

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


@dataclass
class _Walk:
    batch: list[tuple[Job, int]]  # (job, new tokens)
    blocked: list[tuple[Job, int, int]]  # (job, blocks needed, position in level)
    want_upload: list[tuple[Job, int]]  # (job, position in level)
    popped: list[Job]  # never-run jobs popped from their heap for this batch
    free: int  # GPU blocks left after the batch


class SchedulerCore(KVPlacementMixin):
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
        # ENST needs finite quanta even where the policy never demotes.
        self._qf = [self.base_quantum * c.quantum_ratio ** i for i in range(n)]
        self._levels = [Level() for _ in range(n)]
        self.gpu = BlockPool(c.num_gpu_blocks)
        self.host = BlockPool(c.num_host_blocks)
        self._jobs: dict[str, Job] = {}
        self._starve: OrderedDict[str, Job] = OrderedDict()  # least recently run first
        self._seq = 0
        self._iteration = 0
        self._outstanding: dict[int, list[BatchEntry]] = {}
        self._last_batch: set[str] = set()
        self._reserved = 0  # blocks reserved for whole outputs (kv policy "none")
        self._pending_free = 0  # GPU blocks that offloads in flight will free
        # Jobs uploaded back to the GPU that have not run since (see Cand.landed).
        self._landed: set[str] = set()
        # Jobs by where their KV is: memory bounds these, not the number of waiting jobs.
        self._by_loc: dict[Loc, dict[str, Job]] = {loc: {} for loc in Loc if loc is not Loc.NONE}
        self._ranked = {Loc.GPU: PrioritySet(), Loc.HOST: PrioritySet()}
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
        if self._blocks(total) > self.config.num_gpu_blocks:
            raise ValueError(f"job {spec.job_id}: needs {self._blocks(total)} KV blocks, the GPU pool has "
                             f"{self.config.num_gpu_blocks}")
        job = Job(spec, self.policy.join_level(spec.input_len), now)
        self._set_key(job)
        self._jobs[spec.job_id] = job
        self._levels[job.level].add(job)
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
        batch = [self._commit(job, n) for job, n in walk.batch]
        uploads = self._uploads(plan.upload)
        ids = {e.job_id for e in batch}
        preempted = [jid for jid in self._last_batch if jid not in ids and jid in self._jobs
                     and not self._jobs[jid].cancelled and not self._jobs[jid].in_flight]
        self.stats.preemptions += len(preempted)
        self._last_batch = ids
        self._outstanding[it] = batch
        return ScheduleDecision(it, batch, offloads, uploads, dropped, preempted)

    def update(self, result: IterationResult, now: float) -> None:
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
                self.policy.observe(job)
                self._retire(job)

    def copy_done(self, job_id: str, direction: str, now: float) -> None:
        job = self._jobs.get(job_id)
        if job is None:
            raise ValueError(f"copy_done for unknown job {job_id}")
        if direction == "offload" and job.loc is Loc.TO_HOST:
            self._pending_free -= len(job.gpu_blocks)
            self.gpu.free(job.gpu_blocks)
            job.gpu_blocks = []
            self._set_loc(job, Loc.HOST)
        elif direction == "upload" and job.loc is Loc.TO_GPU:
            self.host.free(job.host_blocks)
            job.host_blocks = []
            self._set_loc(job, Loc.GPU)
            if not job.cancelled:
                self._landed.add(job_id)
        else:
            raise ValueError(f"copy_done({job_id}, {direction!r}) but its KV is {job.loc.value}")
        if job.cancelled:
            self._maybe_release(job)

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
        return sum(len(self._by_loc[loc]) - sum(1 for j in self._by_loc[loc].values() if j.cancelled)
                   for loc in (Loc.HOST, Loc.TO_HOST, Loc.TO_GPU))

    @property
    def num_waiting(self) -> int:
        alive = sum(len(lv) for lv in self._levels)
        return alive - self.num_running - self.num_swapped

    @property
    def num_jobs(self) -> int:
        return sum(len(lv) for lv in self._levels)

    def queue_lengths(self) -> list[int]:
        return [len(lv) for lv in self._levels]

    def gpu_blocks_used(self) -> int:
        return self.gpu.num_used

    def host_blocks_used(self) -> int:
        return self.host.num_used

    # ------------------------------------------------------------ internals
    def _blocks(self, tokens: int) -> int:
        return -(-tokens // self.config.block_size)

    def _set_key(self, job: Job) -> None:
        self._seq += 1
        job.seq = self._seq
        job.key = self.policy.key(job)

    def _set_loc(self, job: Job, loc: Loc) -> None:
        if job.loc is not Loc.NONE:
            del self._by_loc[job.loc][job.id]
            if job.loc in self._ranked:
                self._ranked[job.loc].discard(job)
        job.loc = loc
        if loc is not Loc.NONE:
            self._by_loc[loc][job.id] = job
            if loc in self._ranked:
                self._ranked[loc].add(job)

    def _reprioritize(self, job: Job, level: int, key: tuple[int, ...]) -> None:
        ranked = self._ranked.get(job.loc)
        if ranked is not None:
            ranked.discard(job)
        self._levels[job.level].remove(job)
        job.level = level
        job.key = key
        self._levels[level].add(job)
        if ranked is not None:
            ranked.add(job)

    def _move(self, job: Job, level: int) -> None:
        charge = job.charge
        job.charge = 0.0
        self._levels[job.level].charge_sum -= charge  # remove() below then takes off 0
        self._seq += 1
        job.seq = self._seq
        self._reprioritize(job, level, self.policy.key(job))

    def _charge(self, job: Job, elapsed: float, now: float) -> None:
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

    def _walk(self) -> _Walk:
        """Read the levels in priority order and pick this iteration's batch
        without allocating: the highest-priority ready jobs, up to the batch
        size, the token budget and the free blocks. Stops when the batch is full."""
        cfg = self.config
        bs = cfg.block_size
        free = self.gpu.num_free
        reserve_mode = self.kv_policy.reserve_full_length
        unreserved = cfg.num_gpu_blocks - self._reserved
        tokens_left = cfg.max_tokens_per_batch
        max_b = cfg.max_batch_size
        admit_open = True
        waiting = sum(lv.num_fresh for lv in self._levels)  # O(levels)
        # Jobs that cannot run (blocked, swapped) are looked at up to a budget,
        # so memory pressure cannot make one iteration scan every job.
        budget = cfg.max_candidates
        examined = 0
        w = _Walk([], [], [], [], 0)
        for li, lv in enumerate(self._levels):
            keys, jobs = lv.keys, lv.jobs
            i, n_started = 0, len(jobs)
            while len(w.batch) < max_b and tokens_left > 0:
                fresh = lv.peek_fresh(li) if admit_open else None
                if i < n_started and (fresh is None or keys[i] < fresh.key):
                    job, pos = jobs[i], i
                    i += 1
                elif fresh is not None:
                    job, pos = fresh, i
                else:
                    break
                if examined - len(w.batch) >= budget:
                    break
                examined += 1
                if job.in_flight or job.cancelled:
                    continue
                loc = job.loc
                if loc is Loc.GPU:
                    n = min(job.known_tokens - job.num_computed, tokens_left)
                    if n > 1 and self.policy.defer_prefill(job, n, w.batch, waiting):
                        continue
                    need = -(-(job.num_computed + n) // bs) - len(job.gpu_blocks)
                    if need <= free:
                        w.batch.append((job, n))
                        free -= need
                        tokens_left -= n
                    else:
                        w.blocked.append((job, need, pos))
                elif loc is Loc.NONE:
                    if not admit_open:
                        continue
                    n = min(job.known_tokens, tokens_left)
                    if self.policy.defer_prefill(job, n, w.batch, waiting):
                        admit_open = False  # the prefills behind it wait too
                        continue
                    need = -(-n // bs)
                    full = self._blocks(job.spec.input_len + job.spec.max_tokens)
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
                        w.blocked.append((job, need, pos))
                elif loc is Loc.HOST and len(w.batch) + len(w.want_upload) < max_b:
                    w.want_upload.append((job, pos))
            if len(w.batch) >= max_b or tokens_left <= 0 or examined - len(w.batch) >= budget:
                break
        if examined - len(w.batch) >= budget:
            # Progress guarantee: the budget ran out on jobs that cannot run
            # (swapped, copying, waiting for memory), yet jobs whose KV is on
            # the GPU may be behind them. Left idle, their blocks would be
            # evicted for the very jobs that cannot run, and no batch would
            # ever run. Bounded by memory, not by the number of waiting jobs.
            taken = {j.id for j, _ in w.batch}
            for job in self._ranked[Loc.GPU].highest_first():
                if len(w.batch) >= max_b or tokens_left <= 0:
                    break
                if job.id in taken or job.in_flight or job.cancelled:
                    continue
                n = min(job.known_tokens - job.num_computed, tokens_left)
                need = -(-(job.num_computed + n) // bs) - len(job.gpu_blocks)
                if n <= 0:
                    continue
                if need <= free:
                    w.batch.append((job, n))
                    free -= need
                    tokens_left -= n
                else:
                    w.blocked.append((job, need, self._pos(job)))
        w.free = free
        return w

    def _commit(self, job: Job, n: int) -> BatchEntry:
        if not job.started:
            self._levels[job.level].start(job)
        self._landed.discard(job.id)
        if job.loc is Loc.NONE:
            self._set_loc(job, Loc.GPU)
            if self.kv_policy.reserve_full_length:
                job.reserved = self._blocks(job.spec.input_len + job.spec.max_tokens)
                self._reserved += job.reserved
        need = self._blocks(job.num_computed + n) - len(job.gpu_blocks)
        if need > 0:
            job.gpu_blocks.extend(self.gpu.allocate(need))
        job.in_flight += 1
        known = job.known_tokens
        is_prefill = job.num_computed < job.spec.input_len or known - job.num_computed > 1
        return BatchEntry(job.id, is_prefill, n, job.num_computed, list(job.gpu_blocks),
                          sample=job.num_computed + n == known)

    def _retire(self, job: Job) -> None:
        self._levels[job.level].remove(job)
        self._starve.pop(job.id, None)
        self._last_batch.discard(job.id)
        job.cancelled = True
        job.level = -1
        self._maybe_release(job)

    def _maybe_release(self, job: Job) -> None:
        if job.in_flight or job.loc in (Loc.TO_HOST, Loc.TO_GPU):
            return  # an iteration or a copy still uses its blocks
        self.gpu.free(job.gpu_blocks)
        self.host.free(job.host_blocks)
        job.gpu_blocks, job.host_blocks = [], []
        self._reserved -= job.reserved
        job.reserved = 0
        self._set_loc(job, Loc.NONE)
        self._landed.discard(job.id)
        del self._jobs[job.id]
