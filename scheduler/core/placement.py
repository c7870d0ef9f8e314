"""KV-cache placement policies: which jobs' KV to offload to host memory, to
upload back to the GPU, or to drop for recompute. Pure and synchronous: the
scheduler core hands a PlacementView in and turns the PlacementPlan that comes
back into block moves (it owns the block ids).

Ranking uses the estimated next scheduled time (ENST, DESIGN.md): the jobs
that will run last are offloaded (or dropped) first, the jobs that will run
first are uploaded first."""
from __future__ import annotations

from fastserve.common.settings import KV_POLICIES

import math
from dataclasses import dataclass, field
from typing import Callable

KV_POLICY_NAMES = KV_POLICIES  # defined once, in common/settings.py


@dataclass(slots=True)
class Cand:
    job_id: str
    blocks: int  # blocks held (resident: GPU, swapped: host) or needed (blocked)
    enst: float  # seconds until it is expected to be scheduled
    in_batch: bool = False  # chosen for this iteration: only offloaded, never dropped
    admission: bool = False  # blocked job that has no KV (new, or dropped for recompute)
    # Resident job whose KV was uploaded and that has not run since: only the
    # demand of a job that would run now may evict it, never another upload or
    # the watermark. Otherwise, on a slow link, an upload that lands can be
    # moved out again for the next one queued before it ever runs
    # (benchmarks/results/kv_placement.md, "After the swap-thrash fix").
    landed: bool = False
    # Priority order (smaller runs first): breaks ENST ties, e.g. when many
    # jobs are starving and all have ENST 0.
    rank: tuple = ()

    def later_than(self, other: "Cand") -> bool:
        return (self.enst, self.rank) > (other.enst, other.rank)


@dataclass
class PlacementView:
    num_gpu_blocks: int
    free_gpu: int  # after this iteration's batch took its blocks
    pending_free_gpu: int  # GPU blocks that offloads in flight will free
    free_host: int
    host_used: int  # host blocks in use (0: nothing is swapped out)
    # Jobs that would run now but lack GPU blocks (priority order; blocks = needed).
    blocked: list[Cand]
    # Swapped-out jobs that would run now if their KV were on the GPU (priority order).
    want_upload: list[Cand]
    # Computed only when a plan needs them (each costs ENST estimates): idle
    # resident jobs, the lowest-priority first (offload and drop victims), and
    # swapped-out jobs, the highest-priority first (upload candidates).
    resident: Callable[[], list[Cand]]
    swapped: Callable[[], list[Cand]]


@dataclass
class PlacementPlan:
    offload: list[str] = field(default_factory=list)
    upload: list[str] = field(default_factory=list)
    drop: list[str] = field(default_factory=list)


class KVPlacementPolicy:
    name = "base"
    # Admit a job only if its whole output's blocks can be reserved: with no way
    # to move KV, running jobs must never run out of blocks mid-generation.
    reserve_full_length = False

    def plan(self, view: PlacementView) -> PlacementPlan:
        raise NotImplementedError


class NoPlacement(KVPlacementPolicy):
    """`none`: KV never moves; new jobs wait for memory (head-of-line blocking)."""
    name = "none"
    reserve_full_length = True

    def plan(self, view: PlacementView) -> PlacementPlan:
        return PlacementPlan()


class ReactivePlacement(KVPlacementPolicy):
    """`reactive` (swap) and `recompute` (drop): act only at the moment a job
    that should run lacks blocks, by evicting jobs with a later ENST. Only a
    copy may preempt a job chosen to run; a running job's KV is never dropped,
    and a new job is never admitted at the price of recomputing someone else's
    KV (as in vLLM): without these rules a stream of arrivals makes the jobs
    recompute one another forever."""

    def __init__(self, swap: bool) -> None:
        self.swap = swap
        self.name = "reactive" if swap else "recompute"

    def plan(self, view: PlacementView) -> PlacementPlan:
        plan = PlacementPlan()
        if view.blocked or view.want_upload:
            self._react(view, _State(view), plan)
        return plan

    def _react(self, view: PlacementView, st: "_State", plan: PlacementPlan) -> None:
        for c in view.blocked:
            if c.admission and not self.swap:
                continue
            st.make_room(c, plan, self.swap, allow_drop=not c.admission)
        if self.swap:
            for c in view.want_upload:
                if st.free >= c.blocks:
                    st.free -= c.blocks
                    plan.upload.append(c.job_id)
                else:
                    # Never by dropping a resident job's KV: with the host full
                    # that trades one job's recompute for another's swap, and
                    # the jobs drop one another in turn (45,038 drops for 1000
                    # jobs, benchmarks/results/kv_placement.md).
                    st.make_room(c, plan, self.swap, allow_drop=False, for_upload=True)


class ProactivePlacement(ReactivePlacement):
    """FastServe's policy: besides reacting to demand, keep `watermark` of the
    GPU blocks free by offloading the latest-ENST idle jobs ahead of need, and
    upload the earliest-ENST swapped jobs ahead of time while more than
    `reserve` stays free (reserve >= watermark leaves a band, so no ping-pong)."""

    def __init__(self, watermark: float = 0.05, reserve: float = 0.10) -> None:
        super().__init__(swap=True)
        if not (0 <= watermark <= reserve < 1):
            raise ValueError(f"need 0 <= watermark <= reserve < 1, got watermark={watermark}, reserve={reserve}")
        self.name = "proactive"
        self.watermark = watermark
        self.reserve = reserve

    def plan(self, view: PlacementView) -> PlacementPlan:
        plan = PlacementPlan()
        wm = math.ceil(self.watermark * view.num_gpu_blocks)
        rs = math.ceil(self.reserve * view.num_gpu_blocks)
        low = view.free_gpu + view.pending_free_gpu < wm
        if not (view.blocked or view.want_upload or low or (view.host_used and view.free_gpu >= rs)):
            return plan  # nothing wanted, nothing to offload, nothing (or no room) to upload
        st = _State(view)
        self._react(view, st, plan)
        # Offload ahead of need: idle jobs only (the batch runs now), latest ENST first.
        if st.free + st.pending < wm:  # (the victims cost ENST estimates: only when wanted)
            for c in st.victims():
                if st.free + st.pending >= wm:
                    break
                if c.in_batch or c.landed or st.host < c.blocks:
                    continue
                st.evict(c, plan, swap=True)
        if st.free + st.pending < wm or plan.offload or plan.drop or st.free <= rs:
            return plan  # not the moment (or no room) to bring anything back
        uploaded = set(plan.upload)
        for c in sorted(view.swapped(), key=lambda c: (c.enst, c.rank)):
            if c.job_id in uploaded:
                continue
            if st.free - c.blocks < rs:
                break
            st.free -= c.blocks
            plan.upload.append(c.job_id)
        return plan


class _State:
    """Block accounting while a plan is being made."""

    def __init__(self, view: PlacementView) -> None:
        self.free = view.free_gpu
        self.pending = view.pending_free_gpu
        self.host = view.free_host
        self._resident = view.resident
        self.taken: set[str] = set()
        self._sorted: list[Cand] | None = None
        # Per kind of demand (may it drop? is it for an upload?): the victims
        # that may still be evicted for it. A victim that cannot be now never
        # can within this plan (host room only shrinks; in_batch and landed
        # do not change), so each is looked at once per kind, not once per job.
        self._live: dict[tuple[bool, bool], list[Cand]] = {}

    def sorted_victims(self) -> list[Cand]:
        """Idle resident jobs, latest ENST (then lowest priority) first."""
        if self._sorted is None:
            self._sorted = sorted(self._resident(), key=lambda c: (c.enst, c.rank), reverse=True)
        return self._sorted

    def victims(self) -> list[Cand]:
        return [c for c in self.sorted_victims() if c.job_id not in self.taken]

    def evict(self, c: Cand, plan: PlacementPlan, swap: bool) -> None:
        self.taken.add(c.job_id)
        if swap and self.host >= c.blocks:
            self.host -= c.blocks
            self.pending += c.blocks
            plan.offload.append(c.job_id)
        else:
            # No room on the host: recompute is the only way to free the blocks.
            self.free += c.blocks
            plan.drop.append(c.job_id)

    def make_room(self, c: Cand, plan: PlacementPlan, swap: bool, allow_drop: bool,
                  for_upload: bool = False) -> None:
        """Evict idle jobs that will run later than `c` until `c` fits
        (counting blocks that offloads in flight will free). Room for an
        upload (`for_upload`) never costs a job that landed and has not run yet."""
        if self.free + self.pending >= c.blocks:
            self._consume(c.blocks)
            return
        if not allow_drop and not (swap and self.host > 0):
            return  # nothing may be evicted
        kind = (allow_drop, for_upload)
        live = self._live.get(kind)
        if live is None:
            live = self.sorted_victims()
        keep: list[Cand] = []
        for i, v in enumerate(live):
            # Sorted latest first: once one is not later than `c`, none after it is.
            if self.free + self.pending >= c.blocks or not v.later_than(c):
                keep.extend(live[i:])
                break
            if v.job_id in self.taken or (for_upload and v.landed):
                continue
            if v.job_id == c.job_id:
                keep.append(v)
            elif swap and self.host >= v.blocks:
                self.evict(v, plan, swap)  # a copy: cheap enough to preempt a running job for
            elif allow_drop and not v.in_batch:
                self.evict(v, plan, swap=False)
            # else: never evictable for this kind of demand in this plan
        self._live[kind] = keep
        if self.free + self.pending >= c.blocks:
            self._consume(c.blocks)

    def _consume(self, n: int) -> None:
        use = min(self.free, n)
        self.free -= use
        self.pending -= n - use


def make_kv_policy(name: str, *, watermark: float = 0.05, reserve: float = 0.10) -> KVPlacementPolicy:
    if name == "proactive":
        return ProactivePlacement(watermark=watermark, reserve=reserve)
    if name == "reactive":
        return ReactivePlacement(swap=True)
    if name == "recompute":
        return ReactivePlacement(swap=False)
    if name == "none":
        return NoPlacement()
    raise ValueError(f"unknown kv policy {name!r}; choose one of {', '.join(KV_POLICY_NAMES)}")
