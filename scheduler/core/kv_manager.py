"""KVManager: where every job's KV cache is, as the scheduler sees it.

It owns the GPU block pool and each job's GPU block table, and counts the
host blocks its jobs hold in the KV store's pool (the KV store owns the host
block ids and the copies; nobody keeps a copy of another's table). Every
change of a job's KV location goes through one of its methods:

    NONE --admit--> GPU --offload--> TO_HOST --copy_done--> HOST
    HOST --upload--> TO_GPU --copy_done--> GPU
    GPU --drop--> NONE            (recompute later)
    any --release--> gone         (finished, cancelled)

A move is named by a move id: a copy report for an earlier move of the same
job (late, after the KV store or the worker was lost) is recognised as stale.
"""
from __future__ import annotations

from fastserve.scheduler.core.block_pool import BlockPool
from fastserve.scheduler.core.job import Job, Loc
from fastserve.scheduler.core.levels import PrioritySet
from fastserve.scheduler.core.types import KVMove


class KVManager:
    def __init__(self, num_gpu_blocks: int, num_host_blocks: int, block_size: int, reserve_full_length: bool):
        self.block_size = block_size
        self.gpu = BlockPool(num_gpu_blocks)
        self.host_capacity = num_host_blocks
        self.host_used = 0  # host blocks held by jobs on the host or moving
        # Policy `none`: blocks reserved up front for whole outputs.
        self.reserve_full_length = reserve_full_length
        self.reserved = 0
        self.pending_free = 0  # GPU blocks that offloads in flight will free
        # Jobs uploaded back to the GPU that have not run since (see placement.Cand.landed).
        self.landed: set[str] = set()
        # Jobs by where their KV is: memory bounds these, not the number of waiting jobs.
        self.by_loc: dict[Loc, dict[str, Job]] = {loc: {} for loc in Loc if loc is not Loc.NONE}
        self.ranked = {Loc.GPU: PrioritySet(), Loc.HOST: PrioritySet()}
        self._next_move = 0

    # ------------------------------------------------------------------ sizes
    @property
    def num_gpu_blocks(self) -> int:
        return self.gpu.num_blocks

    @property
    def num_free(self) -> int:
        return self.gpu.num_free

    @property
    def host_free(self) -> int:
        return max(self.host_capacity - self.host_used, 0)

    def blocks(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    def need(self, job: Job, tokens: int) -> int:
        """GPU blocks to add so that `job` covers `tokens` tokens."""
        return max(-(-tokens // self.block_size) - len(job.gpu_blocks), 0)

    def num_swapped(self) -> int:
        return sum(len(self.by_loc[loc]) for loc in (Loc.HOST, Loc.TO_HOST, Loc.TO_GPU))

    # ------------------------------------------------------------------ GPU
    def admit(self, job: Job, full_tokens: int) -> None:
        """A job without KV gets its first blocks (grow() allocates them)."""
        assert job.loc is Loc.NONE, job
        self._set_loc(job, Loc.GPU)
        if self.reserve_full_length:
            job.reserved = self.blocks(full_tokens)
            self.reserved += job.reserved

    def grow(self, job: Job, tokens: int) -> None:
        n = self.need(job, tokens)
        if n:
            job.gpu_blocks.extend(self.gpu.allocate(n))

    def drop(self, job: Job) -> None:
        """Free an idle job's GPU KV: it will be recomputed (prefilled again)."""
        assert job.loc is Loc.GPU and not job.in_flight, job
        self.gpu.free(job.gpu_blocks)
        job.gpu_blocks = []
        self._unreserve(job)
        self._set_loc(job, Loc.NONE)

    # ------------------------------------------------------------------ moves
    def offload(self, job: Job) -> KVMove | None:
        """Start copying an idle job's KV to the host; its GPU blocks stay
        taken until the copy is done. None when the host pool is full."""
        assert job.loc is Loc.GPU and not job.in_flight, job
        n = len(job.gpu_blocks)
        if n > self.host_free:
            return None
        job.host_blocks = n
        self.host_used += n
        self.pending_free += n
        self._set_loc(job, Loc.TO_HOST)
        return self._move(job, "offload")

    def upload(self, job: Job) -> KVMove | None:
        """Start copying a swapped-out job's KV back into newly allocated GPU
        blocks. None when the GPU has not enough free blocks."""
        assert job.loc is Loc.HOST and not job.in_flight, job
        if not self.gpu.can_allocate(job.host_blocks):
            return None
        job.gpu_blocks = self.gpu.allocate(job.host_blocks)
        self._set_loc(job, Loc.TO_GPU)
        return self._move(job, "upload")

    def copy_done(self, job: Job, move_id: int, ok: bool = True) -> bool:
        """Apply the report of a move. False (nothing changed) for a stale
        report: not the job's current move. A failed offload leaves the KV on
        the GPU; a failed upload leaves none anywhere (the job recomputes)."""
        if job.move_id != move_id or job.loc not in (Loc.TO_HOST, Loc.TO_GPU):
            return False
        job.move_id = None
        if job.loc is Loc.TO_HOST:
            self.pending_free -= len(job.gpu_blocks)
            if ok:
                self.gpu.free(job.gpu_blocks)
                job.gpu_blocks = []
                self._set_loc(job, Loc.HOST)
            else:
                self._free_host(job)
                self._set_loc(job, Loc.GPU)
        else:
            self._free_host(job)
            if ok:
                self._set_loc(job, Loc.GPU)
                self.landed.add(job.id)
            else:
                self.gpu.free(job.gpu_blocks)
                job.gpu_blocks = []
                self._unreserve(job)
                self._set_loc(job, Loc.NONE)
        return True

    def busy(self, job: Job) -> bool:
        """An iteration or a copy still uses the job's blocks."""
        return bool(job.in_flight) or job.loc in (Loc.TO_HOST, Loc.TO_GPU)

    def release(self, job: Job) -> None:
        """Forget a job that is not busy: every block it holds is free again."""
        assert not self.busy(job), job
        self.gpu.free(job.gpu_blocks)
        job.gpu_blocks = []
        self._free_host(job)
        self._unreserve(job)
        self._set_loc(job, Loc.NONE)

    # ------------------------------------------------------------------ losses
    def lose_gpu(self) -> list[Job]:
        """The worker is gone and its KV with it. Jobs whose KV was on the
        GPU (or being offloaded: the host copy is incomplete) now have none;
        an upload in flight still has its host copy. Returns the jobs that
        lost their KV. Call only with no iteration in flight."""
        lost = []
        for loc in (Loc.GPU, Loc.TO_HOST, Loc.TO_GPU):
            for job in list(self.by_loc[loc].values()):
                assert not job.in_flight, job
                job.move_id = None
                job.gpu_blocks = []
                if loc is Loc.TO_GPU:
                    self._set_loc(job, Loc.HOST)
                    continue
                if loc is Loc.TO_HOST:
                    self._free_host(job)
                self._unreserve(job)
                self._set_loc(job, Loc.NONE)
                lost.append(job)
        self.gpu = BlockPool(self.gpu.num_blocks)
        self.pending_free = 0
        self.landed.clear()
        return lost

    def lose_host(self) -> list[Job]:
        """The KV store (and its pool) is gone: host copies are lost. An
        offload in flight still has the job's GPU blocks, so it stays on the
        GPU; an upload in flight is trusted no more. Returns the jobs left
        without KV."""
        lost = []
        for job in list(self.by_loc[Loc.TO_HOST].values()):
            self.pending_free -= len(job.gpu_blocks)
            job.move_id = None
            self._free_host(job)
            self._set_loc(job, Loc.GPU)
        for loc in (Loc.HOST, Loc.TO_GPU):
            for job in list(self.by_loc[loc].values()):
                job.move_id = None
                self.gpu.free(job.gpu_blocks)
                job.gpu_blocks = []
                self._free_host(job)
                self._unreserve(job)
                self._set_loc(job, Loc.NONE)
                lost.append(job)
        return lost

    def set_host_capacity(self, num_blocks: int) -> None:
        self.host_capacity = num_blocks

    # ------------------------------------------------------------------ ranking
    def unrank(self, job: Job) -> None:
        """Before a job's (level, key) changes: take it out of its priority set..."""
        ranked = self.ranked.get(job.loc)
        if ranked is not None:
            ranked.discard(job)

    def rerank(self, job: Job) -> None:
        """...and put it back in after (the sets stay sorted)."""
        ranked = self.ranked.get(job.loc)
        if ranked is not None:
            ranked.add(job)

    # ------------------------------------------------------------------ internals
    def _move(self, job: Job, direction: str) -> KVMove:
        self._next_move += 1
        job.move_id = self._next_move
        self.landed.discard(job.id)
        return KVMove(self._next_move, job.id, direction, list(job.gpu_blocks))

    def _free_host(self, job: Job) -> None:
        self.host_used -= job.host_blocks
        job.host_blocks = 0

    def _unreserve(self, job: Job) -> None:
        self.reserved -= job.reserved
        job.reserved = 0

    def _set_loc(self, job: Job, loc: Loc) -> None:
        if job.loc is not Loc.NONE:
            del self.by_loc[job.loc][job.id]
            if job.loc in self.ranked:
                self.ranked[job.loc].discard(job)
        job.loc = loc
        if loc is not Loc.NONE:
            self.by_loc[loc][job.id] = job
            if loc in self.ranked:
                self.ranked[loc].add(job)
        if loc is not Loc.GPU:
            self.landed.discard(job.id)
