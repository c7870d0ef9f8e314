"""Hand-made scenarios for the scheduler core, with known answers."""
from __future__ import annotations

import pytest

from fastserve.scheduler.core.placement import make_kv_policy
from fastserve.scheduler.core.config import SchedulerCoreConfig
from fastserve.scheduler.core.scheduler import SchedulerCore
from fastserve.scheduler.core.cost_model import CostModel
from fastserve.scheduler.core.types import IterationResult, JobSpec

# prefill_time(T) = 1 ms * T exactly; decode_time(B, L) = 10 ms + 1 ms * B.
LINEAR = CostModel.from_dict({
    "model": "linear", "device": "test", "block_size": 4,
    "prefill": [{"tokens": 1, "seconds": 0.001}, {"tokens": 1000, "seconds": 1.0}],
    "decode": [{"batch_size": b, "context_len": c, "seconds": 0.010 + 0.001 * b}
               for b in (1, 2, 4, 8) for c in (16, 256)],
})


def make_core(policy="sj-mlfq", kv="proactive", **kw) -> SchedulerCore:
    kw.setdefault("base_quantum", 0.01)
    kw.setdefault("num_gpu_blocks", 1000)
    kw.setdefault("block_size", 4)
    return SchedulerCore(SchedulerCoreConfig(policy=policy, **kw), LINEAR, make_kv_policy(kv))


def step(core, now, out_lens, gen, elapsed=None):
    """One iteration: schedule, 'run' it, update. Returns (decision, finished, now)."""
    d = core.schedule(now)
    el = LINEAR.iteration_time(d.batch) if elapsed is None else elapsed
    now += el
    fin = []
    for e in d.batch:
        if e.sample:
            gen[e.job_id] = gen.get(e.job_id, 0) + 1
            if gen[e.job_id] == out_lens[e.job_id]:
                fin.append(e.job_id)
    core.update(IterationResult(d.iteration, el, fin), now)
    return d, fin, now


def idle(core, now):
    """A schedule() whose batch (if any) takes no time."""
    d = core.schedule(now)
    core.update(IterationResult(d.iteration, 0.0, []), now)
    return d


def run_all(core, out_lens, arrivals, limit=100000):
    """arrivals: {iteration_number: [JobSpec]}; returns finish order."""
    gen, order, now = {}, [], 0.0
    for it in range(limit):
        for spec in arrivals.get(it, []):
            core.add_job(spec, now)
        if not core.num_jobs and it > max(arrivals):
            return order
        _, fin, now = step(core, now, out_lens, gen)
        order += fin
    raise AssertionError("did not finish")


@pytest.mark.parametrize("policy,expected_first", [("sj-mlfq", "s0"), ("mlfq", "s0"), ("srpt", "s0"),
                                                   ("fcfs", "long")])
def test_long_then_short_jobs(policy, expected_first):
    core = make_core(policy, max_batch_size=1)
    out = {"long": 100, **{f"s{i}": 3 for i in range(4)}}
    arrivals = {0: [JobSpec("long", 0, 20, 200, 100)],
                5: [JobSpec(f"s{i}", 0, 5, 200, 3) for i in range(4)]}
    order = run_all(core, out, arrivals)
    assert sorted(order) == sorted(out)
    assert order[0] == expected_first
    if policy == "fcfs":
        assert order == ["long", "s0", "s1", "s2", "s3"]
    else:
        assert order[-1] == "long"  # the shorts jump ahead and finish first


def test_skip_join_by_prompt_length():
    core = make_core("sj-mlfq")
    # quanta 10, 20, 40, 80, 160, 320, 640, 1280 ms; prefill = 1 ms/token.
    for jid, n in [("a", 10), ("b", 11), ("c", 100), ("d", 1000)]:
        core.add_job(JobSpec(jid, 0, n, 8), 0)
    assert [core.job_level(j) for j in "abcd"] == [0, 1, 4, 7]
    assert core.join_histogram[:8] == [1, 1, 0, 0, 1, 0, 0, 1]
    naive = make_core("mlfq")
    for jid, n in [("a", 10), ("d", 1000)]:
        naive.add_job(JobSpec(jid, 0, n, 8), 0)
    assert [naive.job_level(j) for j in "ad"] == [0, 0]


def test_demotion_after_quantum():
    core = make_core("mlfq", max_batch_size=1)
    core.add_job(JobSpec("a", 0, 4, 100), 0)
    gen = {}
    step(core, 0.0, {"a": 100}, gen, elapsed=0.006)
    assert core.job_level("a") == 0 and core.stats.demotions == 0
    step(core, 0.006, {"a": 100}, gen, elapsed=0.006)  # charge 12 ms > 10 ms quantum
    assert core.job_level("a") == 1 and core.stats.demotions == 1
    step(core, 0.012, {"a": 100}, gen, elapsed=0.015)  # fresh charge in Q1 (20 ms): stays
    assert core.job_level("a") == 1
    step(core, 0.027, {"a": 100}, gen, elapsed=0.006)
    assert core.job_level("a") == 2 and core.stats.demotions == 2


def test_starvation_promotion_to_q0():
    core = make_core("mlfq", max_batch_size=1, starvation_threshold=1.0)
    out = {"x": 1000, **{f"y{i}": 1000 for i in range(3)}}
    gen = {}
    core.add_job(JobSpec("x", 0, 4, 1000, 1000), 0)
    step(core, 0.0, out, gen, elapsed=0.05)  # x sinks to Q1
    step(core, 0.05, out, gen, elapsed=0.05)  # and to Q2
    assert core.job_level("x") == 2
    now = 0.1
    core.add_job(JobSpec("y0", now, 4, 1000, 1000), now)
    for _ in range(5):  # y0 in Q0/Q1 keeps running ahead of x
        d, _, now = step(core, now, out, gen, elapsed=0.005)
        assert [e.job_id for e in d.batch] == ["y0"]
    assert core.job_level("x") == 2 and core.stats.promotions == 0
    d, _, now = step(core, 1.1, out, gen, elapsed=0.001)  # x has waited 1.0 s since it last ran
    assert core.stats.promotions == 1
    assert [e.job_id for e in d.batch] == ["x"]  # promoted to Q0 ahead of y0 (now in Q1)


def test_promotions_per_iteration_are_capped():
    core = make_core("mlfq", max_batch_size=1, starvation_threshold=1.0, max_promotions_per_iteration=2)
    gen = {}
    out = {f"j{i}": 100 for i in range(6)}
    for i in range(6):
        core.add_job(JobSpec(f"j{i}", 0, 4, 100, 100), 0)
    now = 0.0
    for _ in range(6):  # each job runs once (batch of 1) and sinks to Q1
        _, _, now = step(core, now, out, gen, elapsed=0.05)
    assert [core.job_level(f"j{i}") for i in range(6)] == [1] * 6
    idle(core, 5.0)  # all six starve; only two are promoted, least recently run first
    assert core.stats.promotions == 2
    assert [core.job_level(f"j{i}") for i in range(6)] == [0, 0, 1, 1, 1, 1]
    idle(core, 5.0)
    assert core.stats.promotions == 4


def test_fcfs_within_a_queue():
    core = make_core("mlfq", max_batch_size=2)
    for jid in "abcd":
        core.add_job(JobSpec(jid, 0, 4, 10), 0)
    d = core.schedule(0.0)
    assert [e.job_id for e in d.batch] == ["a", "b"]
    assert all(e.is_prefill and e.sample and e.num_computed == 0 for e in d.batch)


def test_batch_limits_size_tokens_and_chunking():
    core = make_core("fcfs", max_batch_size=3, max_tokens_per_batch=100)
    for jid in "abcde":
        core.add_job(JobSpec(jid, 0, 60, 10), 0)
    d = core.schedule(0.0)
    assert [(e.job_id, e.num_new_tokens, e.sample) for e in d.batch] == [("a", 60, True), ("b", 40, False)]
    assert len(d.batch[0].block_table) == 15 and len(d.batch[1].block_table) == 10  # block_size 4
    assert not set(d.batch[0].block_table) & set(d.batch[1].block_table)
    core.update(IterationResult(d.iteration, 0.1, []), 0.1)
    d = core.schedule(0.1)
    # a decodes 1 token, b finishes its prompt (20 more, then samples), c gets the rest as a chunk.
    assert [(e.job_id, e.is_prefill, e.num_new_tokens, e.num_computed, e.sample) for e in d.batch] == [
        ("a", False, 1, 60, True), ("b", True, 20, 40, True), ("c", True, 60, 0, True)]


def test_memory_limits_admission():
    core = make_core("fcfs", kv="none", num_gpu_blocks=10, max_batch_size=8)
    for jid in "abc":
        core.add_job(JobSpec(jid, 0, 8, 8), 0)  # 16 tokens = 4 blocks reserved each
    d = core.schedule(0.0)
    assert [e.job_id for e in d.batch] == ["a", "b"]  # c waits: 12 > 10 blocks
    assert core.gpu_blocks_used() == 4


def test_block_table_grows_and_is_freed():
    core = make_core("fcfs", max_batch_size=2)
    core.add_job(JobSpec("a", 0, 4, 10), 0)
    gen = {}
    d, _, now = step(core, 0.0, {"a": 3}, gen)
    assert d.batch[0].block_table == [0]
    d, _, now = step(core, now, {"a": 3}, gen)  # token 5 needs a second block
    assert d.batch[0].block_table == [0, 1] and d.batch[0].num_computed == 4
    d, fin, now = step(core, now, {"a": 3}, gen)
    assert fin == ["a"] and core.gpu_blocks_used() == 0 and core.num_jobs == 0


def test_preemption_is_counted_with_asynchronous_iterations():
    """The service plans iteration i+1 while i runs: a decoding job of batch i
    is still in flight, yet could be in batch i+1. Left out for a job ahead of
    it, it is preempted and counted (the dashboard's preemptions per second)."""
    core = make_core("fcfs", max_batch_size=1)
    core.add_job(JobSpec("a", 0, 4, 50, 50), 0.0)
    d1 = core.schedule(0.0)
    assert [e.job_id for e in d1.batch] == ["a"]
    d2 = core.schedule(0.0)  # a's first token still in flight: fed by the worker
    assert [e.job_id for e in d2.batch] == ["a"] and d2.preempted == []
    core.add_job(JobSpec("b", 0.0, 4, 50, 2), 0.0)
    core.update(IterationResult(d1.iteration, 0.01, []), 0.01)
    # b is not ahead of a under fcfs: no preemption while a keeps running.
    d3 = core.schedule(0.01)
    assert [e.job_id for e in d3.batch] == ["a"] and core.stats.preemptions == 0

    core = make_core("srpt", max_batch_size=1)  # b (2 tokens) goes ahead of a (50)
    core.add_job(JobSpec("a", 0, 4, 50, 50), 0.0)
    d1 = core.schedule(0.0)
    core.add_job(JobSpec("b", 0.0, 4, 50, 2), 0.0)
    d2 = core.schedule(0.0)  # a still in flight
    assert [e.job_id for e in d2.batch] == ["b"]
    assert d2.preempted == ["a"] and core.stats.preemptions == 1
    assert core.num_running == 1


def test_preempted_jobs_keep_their_kv_and_are_reported():
    core = make_core("sj-mlfq", max_batch_size=1)
    gen = {}
    out = {"a": 50, "b": 2}
    core.add_job(JobSpec("a", 0, 4, 50, 50), 0)
    d, _, now = step(core, 0.0, out, gen)
    blocks_a = d.batch[0].block_table
    core.add_job(JobSpec("b", now, 4, 50, 2), now)
    for _ in range(3):
        d, _, now = step(core, now, out, gen, elapsed=0.02)  # a sinks below b
    assert "a" in core.schedule(now).preempted or core.stats.preemptions >= 1
    assert core.job_location("a") == "gpu"
    assert core._jobs["a"].gpu_blocks[:1] == blocks_a


def test_recompute_drops_and_reprefills():
    core = make_core("mlfq", kv="recompute", num_gpu_blocks=4, max_batch_size=1)
    gen = {}
    out = {"low": 40, "hi": 3}
    core.add_job(JobSpec("low", 0, 4, 12, 40), 0)  # 16 tokens max: fits the 4 blocks alone
    now = 0.0
    for _ in range(9):
        _, _, now = step(core, now, out, gen, elapsed=0.05)  # low: 12 tokens in KV, sinks to lower queues
    assert core.gpu_blocks_used() == 3
    core.add_job(JobSpec("hi", now, 4, 8, 3), now)
    # A new job is admitted into free blocks only: it never costs someone's KV.
    d, _, now = step(core, now, out, gen)
    assert [e.job_id for e in d.batch] == ["hi"] and d.dropped == [] and core.gpu_blocks_used() == 4
    # hi's 5th token needs a second block: the idle, lower job's KV is dropped.
    d, _, now = step(core, now, out, gen)
    assert d.dropped == ["low"] and [e.job_id for e in d.batch] == ["hi"]
    assert core.job_location("low") == "none"
    d, fin, now = step(core, now, out, gen)
    assert fin == ["hi"]
    d = core.schedule(now)
    (e,) = d.batch
    assert e.job_id == "low" and e.is_prefill and e.num_computed == 0
    assert e.num_new_tokens == 4 + gen["low"] == 13 and e.sample


def test_recompute_never_drops_to_admit_a_new_job():
    core = make_core("mlfq", kv="recompute", num_gpu_blocks=4, max_batch_size=1)
    gen = {}
    core.add_job(JobSpec("low", 0, 4, 12, 40), 0)
    now = 0.0
    for _ in range(9):
        _, _, now = step(core, now, {"low": 40}, gen, elapsed=0.05)
    core.add_job(JobSpec("hi", now, 8, 8, 3), now)  # needs 2 blocks, 1 free
    d = core.schedule(now)
    assert d.dropped == [] and [e.job_id for e in d.batch] == ["low"]


def test_upload_must_finish_before_the_job_runs():
    core = make_core("mlfq", kv="reactive", num_gpu_blocks=4, num_host_blocks=8, max_batch_size=4)
    gen = {}
    out = {"low": 40, "hi": 3}
    core.add_job(JobSpec("low", 0, 4, 12, 12), 0)
    now = 0.0
    for _ in range(9):
        _, _, now = step(core, now, out, gen, elapsed=0.05)
    core.add_job(JobSpec("hi", now, 8, 8, 3), now)
    d = core.schedule(now)
    assert [m.job_id for m in d.offloads] == ["low"] and d.batch == []
    mv = d.offloads[0]
    assert len(mv.gpu_blocks) == 3
    core.update(IterationResult(d.iteration, 0.0, []), now)
    assert idle(core, now).batch == []  # blocks are only free once the copy is done
    core.copy_done("low", mv.move_id, now)
    assert core.job_location("low") == "host" and core.host_blocks_used() == 3
    while core.has_job("hi"):
        _, _, now = step(core, now, out, gen)
    d = core.schedule(now)
    assert [m.job_id for m in d.uploads] == ["low"] and d.batch == []
    up = d.uploads[0]
    assert len(up.gpu_blocks) == 3 and core.host_blocks_used() == 3
    core.update(IterationResult(d.iteration, 0.0, []), now)
    assert idle(core, now).batch == []  # upload still in flight
    assert not core.copy_done("low", mv.move_id, now)  # a late report of the earlier move changes nothing
    assert core.job_location("low") == "to_gpu"
    core.copy_done("low", up.move_id, now)
    assert core.host_blocks_used() == 0
    d = core.schedule(now)
    assert [(e.job_id, e.is_prefill, e.num_computed) for e in d.batch] == [("low", False, 12)]
    assert d.batch[0].block_table[:3] == up.gpu_blocks and len(d.batch[0].block_table) == 4


def test_cancel_is_idempotent_and_frees_blocks():
    core = make_core("fcfs")
    core.add_job(JobSpec("a", 0, 8, 8), 0)
    core.add_job(JobSpec("b", 0, 8, 8), 0)
    d = core.schedule(0.0)
    assert core.gpu_blocks_used() == 4
    core.cancel("a")  # in flight: blocks stay until the iteration's update
    core.cancel("a")
    assert core.gpu_blocks_used() == 4 and not core.has_job("a")
    core.update(IterationResult(d.iteration, 0.01, []), 0.01)
    assert core.gpu_blocks_used() == 2
    core.cancel("b")
    core.cancel("zzz")  # unknown: no error
    assert core.gpu_blocks_used() == 0 and core.num_jobs == 0


def test_async_iterations_continue_jobs_in_flight():
    """The next batch is planned before the previous result is back: decode
    jobs continue where their iteration in flight ends (one token each, the
    one it samples), and a job is never scheduled past max_tokens."""
    core = make_core("fcfs", max_batch_size=2)
    for jid in "abc":
        core.add_job(JobSpec(jid, 0, 4, 2), 0)  # max_tokens 2
    d1 = core.schedule(0.0)
    d2 = core.schedule(0.0)
    assert [(e.job_id, e.num_computed, e.num_new_tokens, e.sample) for e in d1.batch] == [
        ("a", 0, 4, True), ("b", 0, 4, True)]
    assert [(e.job_id, e.num_computed, e.num_new_tokens, e.is_prefill) for e in d2.batch] == [
        ("a", 4, 1, False), ("b", 4, 1, False)]
    d3 = core.schedule(0.0)  # a and b have 2 tokens in flight = max_tokens: c gets its turn
    assert [e.job_id for e in d3.batch] == ["c"]
    core.update(IterationResult(d1.iteration, 0.01, []), 0.01)
    core.update(IterationResult(d2.iteration, 0.01, ["a", "b"]), 0.02)
    core.update(IterationResult(d3.iteration, 0.01, []), 0.03)
    with pytest.raises(ValueError, match="not outstanding"):
        core.update(IterationResult(d1.iteration, 0.01, []), 0.01)
    assert core.gpu_blocks_used() == 1  # c's block only (4 tokens)


def test_a_job_that_ends_while_its_next_iteration_runs_is_freed_after_it():
    core = make_core("fcfs", max_batch_size=2)
    core.add_job(JobSpec("a", 0, 4, 10), 0)
    d1 = core.schedule(0.0)
    d2 = core.schedule(0.0)  # a's 2nd token, planned before its 1st is known
    assert [e.job_id for e in d2.batch] == ["a"]
    core.update(IterationResult(d1.iteration, 0.01, ["a"]), 0.01)  # EOS at its 1st token
    assert not core.has_job("a") and core.gpu_blocks_used() == 2  # d2 still writes its blocks
    assert core.schedule(0.01).batch == []
    core.update(IterationResult(d2.iteration, 0.01, []), 0.02)
    assert core.gpu_blocks_used() == 0 and core.num_jobs == 0


def test_reschedule_gap_keeps_pipelined_batches_apart():
    core = make_core("fcfs", max_batch_size=2, reschedule_gap=2)
    for jid in "abc":
        core.add_job(JobSpec(jid, 0, 4, 8), 0)
    d1, d2, d3 = core.schedule(0.0), core.schedule(0.0), core.schedule(0.0)
    assert [e.job_id for e in d1.batch] == ["a", "b"] and [e.job_id for e in d2.batch] == ["c"]
    assert [(e.job_id, e.num_computed) for e in d3.batch] == [("a", 4), ("b", 4)]


def test_losing_the_worker_recomputes_what_was_on_the_gpu():
    core = make_core("mlfq", kv="reactive", num_gpu_blocks=6, num_host_blocks=8, max_batch_size=2)
    gen = {}
    out = {"a": 50, "b": 50}
    core.add_job(JobSpec("a", 0, 4, 12, 50), 0)
    core.add_job(JobSpec("b", 0, 4, 12, 50), 0)
    now = 0.0
    for _ in range(3):
        _, _, now = step(core, now, out, gen)
    d = core.schedule(now)  # in flight when the worker dies
    assert len(d.batch) == 2
    assert sorted(core.lose_gpu_kv()) == ["a", "b"]
    assert core.gpu_blocks_used() == 0 and core.num_outstanding == 0
    d = core.schedule(now)
    # Both prefill prompt + the 3 tokens whose results came back; the lost iteration never counted.
    assert [(e.job_id, e.num_computed, e.num_new_tokens, e.is_prefill) for e in d.batch] == [
        ("a", 0, 7, True), ("b", 0, 7, True)]


def test_losing_the_kv_store_recomputes_swapped_jobs_and_ignores_late_reports():
    core = make_core("mlfq", kv="reactive", num_gpu_blocks=4, num_host_blocks=8, max_batch_size=1)
    gen = {}
    core.add_job(JobSpec("low", 0, 4, 12, 40), 0)
    now = 0.0
    for _ in range(9):
        _, _, now = step(core, now, {"low": 40}, gen, elapsed=0.05)
    core.add_job(JobSpec("hi", now, 8, 8, 3), now)
    d = idle(core, now)
    (mv,) = d.offloads
    core.copy_done("low", mv.move_id, now)
    assert core.job_location("low") == "host"
    assert core.lose_host_kv() == ["low"]
    assert core.job_location("low") == "none" and core.host_blocks_used() == 0
    assert not core.copy_done("low", mv.move_id, now)


def test_a_failed_upload_recomputes_and_a_failed_offload_keeps_the_kv():
    core = make_core("mlfq", kv="reactive", num_gpu_blocks=4, num_host_blocks=8, max_batch_size=1)
    gen = {}
    core.add_job(JobSpec("low", 0, 4, 12, 40), 0)
    now = 0.0
    for _ in range(9):
        _, _, now = step(core, now, {"low": 40}, gen, elapsed=0.05)
    core.add_job(JobSpec("hi", now, 8, 8, 3), now)
    (mv,) = idle(core, now).offloads
    core.copy_done("low", mv.move_id, now, ok=False)
    assert core.job_location("low") == "gpu" and core.host_blocks_used() == 0 and core.gpu_blocks_used() == 3


def test_bad_input():
    with pytest.raises(ValueError, match="unknown scheduling policy"):
        SchedulerCoreConfig(policy="lottery")
    with pytest.raises(ValueError, match="unknown kv policy"):
        make_kv_policy("magic")
    with pytest.raises(ValueError, match="input_len"):
        JobSpec("a", 0, -3, 5)
    with pytest.raises(ValueError, match="max_tokens"):
        JobSpec("a", 0, 3, 0)
    core = make_core("fcfs", num_gpu_blocks=4)
    core.add_job(JobSpec("a", 0, 4, 4), 0)
    with pytest.raises(ValueError, match="already added"):
        core.add_job(JobSpec("a", 0, 4, 4), 0)
    with pytest.raises(ValueError, match="KV blocks"):
        core.add_job(JobSpec("big", 0, 10, 10), 0)
    with pytest.raises(ValueError, match="max_model_len"):
        core.add_job(JobSpec("huge", 0, 2000, 100), 0)
    assert not core.copy_done("nobody", 1, 0)  # unknown job: a stale report, ignored
    assert not core.copy_done("a", 1, 0)  # no move of `a` in flight


def test_cancel_during_a_copy_frees_blocks_when_the_copy_is_done():
    core = make_core("mlfq", kv="reactive", num_gpu_blocks=4, num_host_blocks=8, max_batch_size=1)
    gen = {}
    core.add_job(JobSpec("low", 0, 4, 12, 40), 0)
    now = 0.0
    for _ in range(9):
        _, _, now = step(core, now, {"low": 40}, gen, elapsed=0.05)
    core.add_job(JobSpec("hi", now, 8, 8, 3), now)
    d = idle(core, now)
    assert [m.job_id for m in d.offloads] == ["low"]
    move_id = d.offloads[0].move_id
    core.cancel("low")  # the copy is still reading its GPU blocks and writing host blocks
    assert core.gpu_blocks_used() == 3 and core.host_blocks_used() == 3 and not core.has_job("low")
    assert idle(core, now).batch == []  # hi still waits: the blocks are not free yet
    core.copy_done("low", move_id, now)
    assert core.gpu_blocks_used() == 0 and core.host_blocks_used() == 0
    d = core.schedule(now)
    assert [e.job_id for e in d.batch] == ["hi"]
