"""KV placement policies: ENST ordering of offloads, uploads and drops."""
from __future__ import annotations

import pytest

from fastserve.scheduler.core.placement import Cand, PlacementView, make_kv_policy


def view(free=2, pending=0, free_host=100, host_used=0, blocked=(), want=(), resident=(), swapped=(), total=100):
    return PlacementView(num_gpu_blocks=total, free_gpu=free, pending_free_gpu=pending, free_host=free_host,
                         host_used=host_used, blocked=list(blocked), want_upload=list(want),
                         resident=lambda: list(resident), swapped=lambda: list(swapped))


RESIDENT = [Cand("a", 10, 1.0), Cand("b", 10, 5.0), Cand("c", 10, 3.0), Cand("d", 10, 9.0, in_batch=True)]


@pytest.mark.parametrize("watermark,expected", [(0.05, ["b"]), (0.15, ["b", "c"]), (0.25, ["b", "c", "a"])])
def test_proactive_offloads_latest_enst_idle_jobs_first(watermark, expected):
    pol = make_kv_policy("proactive", watermark=watermark, reserve=0.3)
    plan = pol.plan(view(free=2, resident=RESIDENT))
    assert plan.offload == expected and plan.drop == [] and plan.upload == []


def test_proactive_counts_offloads_in_flight():
    pol = make_kv_policy("proactive", watermark=0.05, reserve=0.3)
    assert pol.plan(view(free=2, pending=10, resident=RESIDENT)).offload == []


@pytest.mark.parametrize("reserve,expected", [(0.30, ["y", "z", "x"]), (0.45, ["y"]), (0.55, [])])
def test_proactive_uploads_earliest_enst_first_keeping_the_reserve(reserve, expected):
    pol = make_kv_policy("proactive", watermark=0.05, reserve=reserve)
    swapped = [Cand("x", 10, 4.0), Cand("y", 10, 1.0), Cand("z", 10, 2.0)]
    plan = pol.plan(view(free=60, host_used=30, swapped=swapped))
    assert plan.upload == expected and plan.offload == []


@pytest.mark.parametrize("name,field", [("recompute", "drop"), ("reactive", "offload"), ("proactive", "offload")])
def test_demand_evicts_only_jobs_that_run_later(name, field):
    # proactive with no watermark: only its demand-driven part acts.
    pol = make_kv_policy(name, watermark=0.0, reserve=0.0)
    resident = [Cand("a", 10, 1.0), Cand("b", 10, 5.0), Cand("c", 10, 0.1)]
    plan = pol.plan(view(free=5, total=1000, blocked=[Cand("n", 15, 0.5)], resident=resident))
    assert getattr(plan, field) == ["b"]
    # Nobody runs later than the blocked job: nothing is evicted, it waits.
    plan = pol.plan(view(free=5, total=1000, blocked=[Cand("n", 15, 0.5)], resident=[Cand("c", 10, 0.1)]))
    assert plan.offload == [] and plan.drop == []


def test_swap_falls_back_to_drop_when_the_host_is_full():
    plan = make_kv_policy("reactive").plan(
        view(free=0, free_host=5, total=1000, blocked=[Cand("n", 4, 0.0)], resident=[Cand("b", 10, 5.0)]))
    assert plan.drop == ["b"] and plan.offload == []


def test_reactive_uploads_wanted_jobs_only_when_asked():
    pol = make_kv_policy("reactive")
    swapped = [Cand("x", 10, 4.0)]
    assert pol.plan(view(free=60, host_used=10, swapped=swapped)).upload == []
    plan = pol.plan(view(free=60, host_used=10, want=[Cand("x", 10, 0.0)], swapped=swapped))
    assert plan.upload == ["x"]


def test_none_never_moves_anything():
    pol = make_kv_policy("none")
    assert pol.reserve_full_length
    plan = pol.plan(view(free=0, blocked=[Cand("n", 4, 0.0)], resident=RESIDENT))
    assert plan.offload == plan.drop == plan.upload == []


def test_bad_parameters():
    with pytest.raises(ValueError, match="watermark"):
        make_kv_policy("proactive", watermark=0.2, reserve=0.1)
    with pytest.raises(ValueError, match="unknown kv policy"):
        make_kv_policy("swap-everything")


def test_enst_ties_are_broken_by_priority():
    # Every job starving: all ENSTs are 0. The lower-priority idle job still yields.
    pol = make_kv_policy("recompute")
    plan = pol.plan(view(free=0, total=1000, blocked=[Cand("hi", 1, 0.0, rank=(0, (5,)))],
                         resident=[Cand("lo", 10, 0.0, rank=(3, (9,))), Cand("top", 10, 0.0, rank=(0, (1,)))]))
    assert plan.drop == ["lo"]


def test_enst_work_ahead_by_level():
    from fastserve.scheduler.core.enst import enst, work_ahead_by_level

    # quanta 1, 2, 4 s; two jobs in Q0 (0.5 s used), one in Q1 (0.5 s used).
    base = work_ahead_by_level([2, 1, 0], [0.5, 0.5, 0.0], [1.0, 2.0, 4.0])
    # Q1: what the Q0 jobs have left (1.5). Q2: that plus their Q1 quanta (2x2), plus the Q1 job's 1.5.
    assert base == [0.0, 1.5, 7.0]
    assert enst(base[2], 3, 4.0, 2, None) == (7.0 + 12.0) / 2
    assert enst(base[2], 3, 4.0, 2, 1.25) == 1.25  # promoted for starvation sooner
    assert enst(base[2], 3, 4.0, 2, -3.0) == 0.0


def test_the_cores_enst_is_the_formula_of_enst_py():
    """The core inlines enst() for speed: same numbers, starvation cap included."""
    from fastserve.scheduler.core.config import SchedulerCoreConfig
    from fastserve.scheduler.core.cost_model import CostModel
    from fastserve.scheduler.core.enst import enst
    from fastserve.scheduler.core.scheduler import SchedulerCore
    from fastserve.scheduler.core.types import IterationResult, JobSpec

    cfg = SchedulerCoreConfig(policy="mlfq", max_batch_size=2, num_gpu_blocks=100, block_size=4, base_quantum=0.01,
                              starvation_threshold=0.5)
    core = SchedulerCore(cfg, CostModel.default(block_size=4), make_kv_policy("proactive"))
    for i in range(6):
        core.add_job(JobSpec(f"j{i}", 0.0, 8, 40), 0.0)
    now = 0.0
    for _ in range(8):
        d = core.schedule(now)
        now += 0.02
        core.update(IterationResult(d.iteration, 0.02, []), now)
    base = core._enst_base()
    enst_of = core._enst_function(base, now)
    for job in core._jobs.values():
        lv = core._levels[job.level]
        want = enst(base[job.level], lv.position(job), core._qf[job.level], 2,
                    core.starvation_threshold - (now - job.starve_clock))
        assert enst_of(job) == pytest.approx(want)


def test_core_offloads_the_job_that_will_run_last():
    from fastserve.scheduler.core.config import SchedulerCoreConfig
    from fastserve.scheduler.core.scheduler import SchedulerCore
    from fastserve.scheduler.core.cost_model import CostModel
    from fastserve.scheduler.core.types import IterationResult, JobSpec

    cfg = SchedulerCoreConfig(policy="mlfq", max_batch_size=1, num_gpu_blocks=20, num_host_blocks=40,
                              block_size=4, base_quantum=0.01, starvation_threshold=100.0)
    core = SchedulerCore(cfg, CostModel.default(block_size=4), make_kv_policy("proactive", watermark=0.3, reserve=0.5))
    # a, b, c (4 blocks each) run once in that order and sink to Q1, where FCFS keeps that order.
    for jid in "abc":
        core.add_job(JobSpec(jid, 0.0, 16, 4), 0.0)
    for jid in "abc":
        d = core.schedule(0.0)
        assert [e.job_id for e in d.batch] == [jid]
        core.update(IterationResult(d.iteration, 0.015, []), 0.0)
    assert [core.job_level(j) for j in "abc"] == [1, 1, 1] and core.gpu_blocks_used() == 12
    # A new job takes 4 more blocks: 4 free < watermark 6 -> offload the idle job that runs last.
    core.add_job(JobSpec("d", 0.0, 16, 4), 0.0)
    d = core.schedule(0.0)
    assert [e.job_id for e in d.batch] == ["d"] and [m.job_id for m in d.offloads] == ["c"]
    assert d.offloads[0].gpu_blocks == [8, 9, 10, 11]


@pytest.mark.parametrize("name", ["reactive", "proactive"])
def test_upload_room_never_costs_a_landed_job_or_a_drop(name):
    pol = make_kv_policy(name, watermark=0.0, reserve=0.0)
    resident = [Cand("a", 10, 5.0, landed=True), Cand("b", 10, 6.0), Cand("c", 10, 7.0, landed=True)]
    want = [Cand("x", 20, 0.0)]
    # Room for x: only b may go (a and c were uploaded and have not run yet).
    plan = pol.plan(view(free=0, total=1000, host_used=20, want=want, resident=resident))
    assert plan.offload == ["b"] and plan.drop == [] and plan.upload == []
    # Host full: x waits; nobody's KV is dropped to bring it in.
    plan = pol.plan(view(free=0, free_host=0, total=1000, host_used=20, want=want, resident=resident))
    assert plan.offload == [] and plan.drop == [] and plan.upload == []
    # The demand of a job that would run now still may move a landed job.
    plan = pol.plan(view(free=0, total=1000, blocked=[Cand("n", 10, 0.0)], resident=resident))
    assert plan.offload == ["c"]


def test_proactive_watermark_spares_landed_jobs():
    pol = make_kv_policy("proactive", watermark=0.05, reserve=0.3)
    resident = [Cand("a", 10, 1.0), Cand("b", 10, 5.0, landed=True), Cand("c", 10, 3.0)]
    assert pol.plan(view(free=2, resident=resident)).offload == ["c"]


@pytest.mark.parametrize("kv", ["reactive", "proactive"])
def test_small_host_pool_and_slow_link_make_progress(kv):
    """Swap livelock/thrash (benchmarks/results/kv_placement.md): with a small
    host pool, a slow link and a small candidate budget, the jobs the walk gave
    up before were evicted for jobs that could not run, uploads dropped other
    jobs' KV in turn, and `reactive` stalled with every GPU block held
    (seed 0) or dropped each job ~2.6 times (`proactive`)."""
    from fastserve.scheduler.core.scheduler import SchedulerCore
    from fastserve.scheduler.core.cost_model import CostModel
    from fastserve.scheduler.sim.simulator import SimConfig, simulate
    from fastserve.scheduler.sim.workload import make_workload

    limit = 20_000
    schedule = SchedulerCore.schedule

    def bounded(self, now):
        assert self.iteration < limit, "no progress: iteration budget spent"
        return schedule(self, now)

    jobs = make_workload("sharegpt", num_jobs=80, rate=5.0, cv=2, seed=0)
    cfg = SimConfig(policy="sj-mlfq", kv_policy=kv, gpu_kv_blocks=130, host_kv_blocks=260, copy_bandwidth=2e8,
                    core={"max_candidates": 4})
    SchedulerCore.schedule = bounded
    try:
        res = simulate(jobs, cfg, CostModel.default())
    finally:
        SchedulerCore.schedule = schedule
    assert len(res.records) == 80 and res.iterations < limit
    assert res.metrics["drops"] < len(jobs)
