"""The batch priority class in the scheduler core: batch jobs (priority 1)
run only on the capacity interactive jobs leave, under every policy, are
never promoted ahead of them for starvation, and lose their KV first."""
from __future__ import annotations

import pytest

from fastserve.scheduler.core.types import JobSpec
from test_sched_core import make_core, step


@pytest.mark.parametrize("policy", ["sj-mlfq", "mlfq", "fcfs", "srpt"])
def test_batch_jobs_fill_the_batch_behind_every_interactive_job(policy):
    core = make_core(policy, max_batch_size=4)
    out, gen = {}, {}
    for i in range(3):  # batch work first: it is there before any interactive job
        core.add_job(JobSpec(f"b{i}", 0, 8, 50, 50, priority=1), 0)
        out[f"b{i}"] = 50
    d, _, now = step(core, 0.0, out, gen)
    assert sorted(e.job_id for e in d.batch) == ["b0", "b1", "b2"]  # idle capacity is used
    for i in range(3):
        core.add_job(JobSpec(f"i{i}", now, 8, 400, 400), now)
        out[f"i{i}"] = 400
    for _ in range(40):  # the interactive jobs sink through the MLFQ and still come first
        d, _, now = step(core, now, out, gen)
        ids = [e.job_id for e in d.batch]
        assert {"i0", "i1", "i2"} <= set(ids), ids
        assert len(ids) == 4  # one slot left: one batch job
    assert core.job_level("b0") == core.background
    assert all(core.job_level(f"i{i}") < core.background for i in range(3))


def test_batch_jobs_are_not_promoted_for_starvation():
    core = make_core("mlfq", max_batch_size=1, starvation_threshold=0.5)
    out, gen = {"b": 10, "i": 1000}, {}
    core.add_job(JobSpec("b", 0, 4, 10, 10, priority=1), 0)
    core.add_job(JobSpec("i", 0, 4, 1000, 1000), 0)
    now = 0.0
    for _ in range(200):  # 2 s of interactive work, 4x the starvation threshold
        d, _, now = step(core, now, out, gen, elapsed=0.01)
        assert [e.job_id for e in d.batch] == ["i"]
    assert core.stats.promotions == 0 and core.job_level("b") == core.background


def test_interactive_jobs_take_the_kv_of_batch_jobs():
    """A full GPU pool of running batch jobs: an interactive job arrives and
    the batch jobs' KV is offloaded (recomputed under `recompute`) for it."""
    for kv in ("proactive", "recompute"):
        core = make_core("sj-mlfq", kv=kv, max_batch_size=8, num_gpu_blocks=12, num_host_blocks=64)
        out, gen = {}, {}
        for i in range(4):
            core.add_job(JobSpec(f"b{i}", 0, 10, 20, 20, priority=1), 0)  # 3 blocks each (block size 4)
            out[f"b{i}"] = 20
        d, _, now = step(core, 0.0, out, gen)
        assert len(d.batch) == 4 and core.gpu_blocks_used() == 12
        core.add_job(JobSpec("i", now, 8, 4, 4), now)
        out["i"] = 4
        ran = False
        for _ in range(5):
            d, _, now = step(core, now, out, gen)
            for move in d.offloads + d.uploads:  # the copies finish within the iteration
                core.copy_done(move.job_id, move.move_id, now)
            if any(e.job_id == "i" for e in d.batch):
                ran = True
                break
        assert ran, kv
        assert core.stats.offloads + core.stats.drops >= 1, kv
