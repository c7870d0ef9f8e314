"""The KV-placement half of SchedulerCore: ENST estimates, the bounded view
handed to the placement policy, and applying its plan (offloads, drops,
uploads) to the block pools. A mixin: it works on SchedulerCore's state."""
from __future__ import annotations

import bisect
from typing import TYPE_CHECKING

from fastserve.scheduler.core.placement import Cand, PlacementPlan, PlacementView

from fastserve.scheduler.core.enst import enst, work_ahead_by_level
from fastserve.scheduler.core.job import Job, Loc
from fastserve.scheduler.core.types import KVMove

if TYPE_CHECKING:
    from fastserve.scheduler.core.scheduler import _Walk


class KVPlacementMixin:
    def _enst_base(self) -> list[float]:
        lv = self._levels
        return work_ahead_by_level([len(x) for x in lv], [x.charge_sum for x in lv], self._qf)

    def _pos(self, job: Job) -> int:
        """Position among the started jobs of its level."""
        return bisect.bisect_left(self._levels[job.level].keys, job.key)

    def _enst(self, job: Job, pos: int, base: list[float], now: float) -> float:
        starve = self.starvation_threshold - (now - job.starve_clock) if self.policy.starvation else None
        return enst(base[job.level], pos, self._qf[job.level], self.config.max_batch_size, starve)

    def _view(self, w: _Walk, now: float) -> PlacementView:
        base = self._enst_base()
        in_batch = {j.id for j, _ in w.batch}

        cache: list[tuple[list[Cand], list[Cand]]] = []
        limit = self.config.max_candidates

        def candidates() -> tuple[list[Cand], list[Cand]]:
            """The `limit` lowest-priority resident jobs (offload victims come
            from there) and the `limit` highest-priority swapped ones (upload
            candidates), with their ENST. Costs O(jobs with KV), never
            O(waiting jobs)."""
            if cache:
                return cache[0]
            resident: list[Cand] = []
            for j in self._ranked[Loc.GPU].lowest_first():
                if len(resident) >= limit:
                    break
                if not j.in_flight and not j.cancelled:
                    resident.append(Cand(j.id, len(j.gpu_blocks), self._enst(j, self._pos(j), base, now),
                                         j.id in in_batch, rank=(j.level, j.key), landed=j.id in self._landed))
            swapped: list[Cand] = []
            for j in self._ranked[Loc.HOST].highest_first():
                if len(swapped) >= limit:
                    break
                if not j.cancelled:
                    swapped.append(Cand(j.id, len(j.host_blocks), self._enst(j, self._pos(j), base, now),
                                        rank=(j.level, j.key)))
            cache.append((resident, swapped))
            return cache[0]

        return PlacementView(
            num_gpu_blocks=self.config.num_gpu_blocks, free_gpu=w.free, pending_free_gpu=self._pending_free,
            free_host=self.host.num_free, host_used=self.host.num_used,
            blocked=[Cand(j.id, need, self._enst(j, pos, base, now), admission=not j.started, rank=(j.level, j.key))
                     for j, need, pos in w.blocked],
            want_upload=[Cand(j.id, len(j.host_blocks), self._enst(j, pos, base, now), rank=(j.level, j.key))
                         for j, pos in w.want_upload],
            candidates=candidates)

    def _evict(self, plan: PlacementPlan) -> tuple[list[KVMove], list[str]]:
        offloads = []
        for jid in plan.offload:
            job = self._jobs[jid]
            assert job.loc is Loc.GPU and not job.in_flight, job
            n = len(job.gpu_blocks)
            if not self.host.can_allocate(n):
                continue  # the policy over-booked the host: the job simply stays
            job.host_blocks = self.host.allocate(n)
            self._set_loc(job, Loc.TO_HOST)
            self._landed.discard(jid)
            self._pending_free += n
            offloads.append(KVMove(jid, "offload", list(job.gpu_blocks), list(job.host_blocks)))
        dropped = []
        for jid in plan.drop:
            job = self._jobs[jid]
            assert job.loc is Loc.GPU and not job.in_flight, job
            self.gpu.free(job.gpu_blocks)
            job.gpu_blocks = []
            job.num_computed = 0
            self._set_loc(job, Loc.NONE)
            self._landed.discard(jid)
            # Back among the jobs without KV, at its old place in the queue: it
            # is re-admitted like a new job (and never costs anyone's KV).
            lv = self._levels[job.level]
            lv.remove(job)
            job.started = False
            lv.add(job)
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
            n = len(job.host_blocks)
            if not self.gpu.can_allocate(n):
                continue  # the batch took the blocks after all; ask again next iteration
            job.gpu_blocks = self.gpu.allocate(n)
            self._set_loc(job, Loc.TO_GPU)
            self._landed.discard(jid)
            moves.append(KVMove(jid, "upload", list(job.host_blocks), list(job.gpu_blocks)))
        self.stats.uploads += len(moves)
        self.stats.swaps += len(moves)
        return moves
