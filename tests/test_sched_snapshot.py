"""The snapshot builder (scheduler/core/snapshot.py) against hand-made core
states with known answers: which jobs each level lists, in which order and
state, what the caps leave out, the KV and the counters."""
from __future__ import annotations

import math

from fastserve.common.schemas import SchedulerSnapshot, LoopTotals, SnapshotCounters, decode, encode
from fastserve.scheduler.core.job import Job
from fastserve.scheduler.core.kv_manager import KVManager
from fastserve.scheduler.core.levels import Level
from fastserve.scheduler.core.scheduler import SchedulerStats
from fastserve.scheduler.core.snapshot import build_snapshot
from fastserve.scheduler.core.types import IterationResult, JobSpec

from test_sched_core import make_core


def _job(name: str, level: int, seq: int, *, started: bool, input_len: int = 8) -> Job:
    job = Job(JobSpec(name, 0.0, input_len, 16), level, 0.0)
    job.seq, job.key, job.started = seq, (seq,), started
    return job


def _on_gpu(kv: KVManager, job: Job, tokens: int = 8) -> Job:
    kv.admit(job, tokens)
    kv.grow(job, tokens)
    return job


def _hand_made():
    """Level 0: a (running), b (never run). Level 1: c (on the host), d
    (being offloaded), e (an iteration in flight, not in the latest batch).
    Level 2: 300 never-run jobs, the 3 with the smallest keys cancelled (stale
    heap entries), and f, started, running, behind all of them."""
    kv = KVManager(num_gpu_blocks=20, num_host_blocks=30, block_size=4, reserve_full_length=False)
    levels = [Level(), Level(), Level()]
    a = _on_gpu(kv, _job("a", 0, 1, started=True))
    b = _job("b", 0, 2, started=False, input_len=5)
    c = _on_gpu(kv, _job("c", 1, 3, started=True, input_len=12))
    kv.copy_done(c, kv.offload(c).move_id)
    d = _on_gpu(kv, _job("d", 1, 4, started=True))
    kv.offload(d)  # copy in flight: GPU blocks still held
    e = _on_gpu(kv, _job("e", 1, 5, started=True))
    e.in_flight = 1
    a.num_generated, a.charge, a.join_level = 3, 0.004, 0
    e.num_generated, e.charge, e.join_level = 7, 0.015, 0
    for job in (a, b):
        levels[0].add(job)
    for job in (c, d, e):
        levels[1].add(job)
    for i in range(300, 0, -1):  # pushed in reverse: the heap has to order them
        levels[2].add(_job(f"w{i:03d}", 2, 100 + i, started=False))
    for i in (1, 2, 3):
        stale = next(entry[2] for entry in levels[2].fresh if entry[1] == f"w{i:03d}")
        levels[2].remove(stale)
        stale.cancelled = True
    f = _on_gpu(kv, _job("f", 2, 999, started=True))
    levels[2].add(f)
    return kv, levels, [a, f]


def test_levels_states_and_caps_from_a_hand_made_state():
    kv, levels, running = _hand_made()
    stats = SchedulerStats(preemptions=4, demotions=3, promotions=1, offloads=2, uploads=1, finished=9, cancelled=2)
    snap = build_snapshot(levels, (0.01, 0.02, math.inf), running, kv, stats, admitted=320, iteration=41,
                          slo=0.1, max_jobs=10)
    assert [lv.num_jobs for lv in snap.levels] == [2, 3, 298]
    assert [lv.quantum for lv in snap.levels] == [0.01, 0.02, None]  # the last level never demotes
    l0, l1, l2 = snap.levels
    # Shares of 10 places: 2 and 3 for the small levels, the 5 left for level 2.
    assert [(j.job_id, j.state, j.kv) for j in l0.jobs] == [("a", "running", "gpu"), ("b", "waiting", "none")]
    assert [(j.job_id, j.state, j.kv) for j in l1.jobs] == [
        ("c", "host", "host"), ("d", "moving", "to_host"), ("e", "in_flight", "gpu")]
    # Level 2: the 5 smallest valid keys (w001..w003 are stale), then f, listed because it runs.
    assert [j.job_id for j in l2.jobs] == ["w004", "w005", "w006", "w007", "w008", "f"]
    assert l2.jobs[-1].state == "running"
    assert [lv.more for lv in snap.levels] == [0, 0, 298 - 6]
    a, e = l0.jobs[0], l1.jobs[2]
    assert (a.generated, a.charge, a.level, a.join_level, a.prompt_len) == (3, 0.004, 0, 0, 8)
    assert (e.generated, e.charge, e.level, e.join_level) == (7, 0.015, 1, 0)
    assert l0.jobs[1].prompt_len == 5 and l1.jobs[0].prompt_len == 12
    # 8 tokens = 2 blocks each: a, d, e, f on the GPU (d until its copy is done), c and d on the host.
    assert (snap.kv.gpu_used, snap.kv.gpu_total, snap.kv.host_used, snap.kv.host_total) == (8, 20, 4, 30)
    assert (snap.kv.offloading, snap.kv.uploading) == (1, 0)
    assert snap.counters == SnapshotCounters(admitted=320, finished=9, cancelled=2, preemptions=4, demotions=3,
                                             promotions=1, offloads=2, uploads=1, drops=0)
    assert (snap.iteration, snap.slo, snap.num_jobs, snap.num_running) == (41, 0.1, 303, 2)


def test_the_view_leaves_the_heap_as_it_was():
    kv, levels, running = _hand_made()
    before = list(levels[2].fresh)
    build_snapshot(levels, (0.01, 0.02, math.inf), running, kv, SchedulerStats(), 0, 0, 0.1, max_jobs=50)
    assert levels[2].fresh == before


def test_a_real_core_jobs_sink_and_get_preempted():
    """sj-mlfq with 10 ms in Q0, prefill 1 ms per token: a and b (5 tokens)
    join Q0, c (15) Q1, d (30) Q2. Two jobs per batch."""
    core = make_core(max_batch_size=2, num_queues=4)
    for name, n in (("a", 5), ("b", 5), ("c", 15), ("d", 30)):
        core.add_job(JobSpec(name, 0.0, n, 50), 0.0)
    snap = core.snapshot()
    # The last level is the batch class (priority > 0), below every level of the policy.
    assert [[j.job_id for j in lv.jobs] for lv in snap.levels] == [["a", "b"], ["c"], ["d"], [], []]
    assert snap.levels[-1].quantum is None
    assert {j.state for lv in snap.levels for j in lv.jobs} == {"waiting"}

    d1 = core.schedule(0.0)
    core.update(IterationResult(d1.iteration, 0.004, []), 0.004)
    d2 = core.schedule(0.004)
    core.update(IterationResult(d2.iteration, 0.02, []), 0.024)  # a and b pass Q0's 10 ms: demoted
    snap = core.snapshot()
    # In Q1, c entered first; a and b entered when they were demoted.
    assert [[(j.job_id, j.state) for j in lv.jobs] for lv in snap.levels] == [
        [], [("c", "waiting"), ("a", "running"), ("b", "running")], [("d", "waiting")], [], []]
    a = snap.levels[1].jobs[1]
    assert (a.generated, a.charge, a.join_level, a.kv) == (2, 0.0, 0, "gpu")

    d3 = core.schedule(0.024)  # c and a run, b is preempted
    assert sorted(e.job_id for e in d3.batch) == ["a", "c"]
    snap = core.snapshot()
    assert [(j.job_id, j.state) for j in snap.levels[1].jobs] == [("c", "running"), ("a", "running"),
                                                                  ("b", "waiting")]
    assert snap.counters == SnapshotCounters(admitted=4, demotions=2, preemptions=1)
    assert (snap.iteration, snap.num_jobs, snap.num_running) == (3, 4, 2)
    assert snap.kv.gpu_used == 2 + 2 + 4  # a: 7 tokens, b: 6, c: its prompt of 15, in 4-token blocks
    assert snap.kv.gpu_total == 1000


def test_the_snapshot_travels_as_a_typed_message():
    core = make_core(max_batch_size=2)
    core.add_job(JobSpec("a", 0.0, 5, 50), 0.0)
    core.schedule(0.0)
    msg = SchedulerSnapshot("s1", 1.5, core.snapshot(), LoopTotals(iterations=1, step_seconds=0.01), replica="r0",
                            policy="sj-mlfq", kv_policy="proactive", max_batch_size=2)
    back = decode(encode(msg))
    assert back == msg
    assert back.core.levels[0].jobs[0].state == "running"
