"""The `gittins` policy (what `default` means), the clairvoyant `oracle`, the
output-length model behind them, and the lower bound: hand-made cases with
known answers, driven through SchedulerCore.schedule()/update()."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from fastserve.common.config import config_from_args
from fastserve.cli import build_parser, main
from fastserve.launcher import NodeConfig
from fastserve.scheduler.core.config import SchedulerCoreConfig
from fastserve.scheduler.core.cost_model import CostModel
from fastserve.scheduler.core.index_policies import GittinsPolicy
from fastserve.scheduler.core.length_model import OutputLengthModel
from fastserve.scheduler.core.policies import DEFAULT_POLICY, make_policy
from fastserve.scheduler.core.types import JobSpec
from fastserve.scheduler.sim.bound import lower_bound
from fastserve.scheduler.sim.simulator import SimConfig, simulate
from fastserve.scheduler.sim.workload import TraceJob, synthetic
from test_sched_core import LINEAR, make_core, run_all, step


def teach(core, pairs, times=64):
    """The length model has seen `times` finished jobs of each (input, output)."""
    for _ in range(times):
        for inp, out in pairs:
            core.policy.lengths.observe(inp, out)


# ------------------------------------------------------------------ names
def test_default_names_the_gittins_policy_everywhere(capsys):
    assert DEFAULT_POLICY == "gittins"
    assert isinstance(make_policy("default", cost_model=LINEAR, base_quantum=0.01), GittinsPolicy)
    assert SchedulerCoreConfig().policy == "default" and SimConfig().policy == "default"
    assert make_core("default").policy.name == "gittins"
    # `fastserve up --policy default`, and the default of `up`
    assert config_from_args(NodeConfig, {"policy": "default"}, env={}).scheduler_config().policy == "default"
    assert config_from_args(NodeConfig, {}, env={}).policy == "default"
    assert build_parser().parse_args(["up", "--policy", "default"]).policy == "default"
    # `fastserve sim --policy default`
    assert main(["sim", "--policy", "default,fcfs", "--workload", "chat", "--rate", "2", "--num-jobs", "30",
                 "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out) == {"default", "fcfs"} and out["default"]["num_jobs"] == 30
    # the load generator
    spec = importlib.util.spec_from_file_location(
        "loadgen_policies", Path(__file__).resolve().parent.parent / "benchmarks" / "loadgen.py")
    lg = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = lg  # its dataclasses look their module up
    spec.loader.exec_module(lg)
    assert lg.parse_args(["--spawn", "--policy", "default,fcfs", "--workload", "chat,rag"]).policy == "default,fcfs"


# ---------------------------------------------------------- length model
def test_length_model_learns_per_prompt_bucket():
    m = OutputLengthModel(LINEAR, max_batch_size=8, max_len=2048)
    for _ in range(256):
        m.observe(1000, 10)
        m.observe(20, 300)
    long_b, short_b = m.bucket(1000), m.bucket(20)
    assert long_b != short_b
    p = m.distribution()
    assert p[long_b, m.age_bin(9)] > 0.9 and p[short_b, m.age_bin(299)] > 0.9
    assert m.expected_weight[long_b] == pytest.approx(1 / 10, rel=0.1)
    # (shrunk a little towards the pooled histogram, half of which is 10-token outputs)
    assert 1 / 300 < m.expected_weight[short_b] < 1.7 / 300
    # Nearly deterministic lengths: the closer to its end, the higher the index
    # (below 10 tokens, the pooled histogram's short outputs lift it too).
    ages = [m.started[short_b, m.age_bin(g)] for g in (20, 100, 250, 298)]
    assert ages == sorted(ages) and ages[-1] > 5 * ages[0]
    # A longer prefill still to do lowers a fresh job's index.
    assert m.fresh_index(1000, 1.0) < m.fresh_index(1000, 0.1)


# -------------------------------------------------------- gittins policy
def test_long_prompt_short_answer_goes_first_where_skip_join_sends_it_last():
    # What issue 13 is about: sj-mlfq puts an 800-token prompt in a low queue
    # (its prefill is long), although its answer (10 tokens) weighs 1/10 per
    # token of latency against the chat job's 1/400.
    specs = [JobSpec("chat", 0, 8, 1000, 400), JobSpec("doc", 0, 800, 1000, 10)]
    sj = make_core("sj-mlfq", max_batch_size=1)
    core = make_core("default", max_batch_size=1)
    teach(core, [(800, 10), (8, 400)])
    for c in (sj, core):
        for spec in specs:
            c.add_job(spec, 0)
    assert sj.job_level("doc") > sj.job_level("chat") == 0
    assert [e.job_id for e in sj.schedule(0.0).batch] == ["chat"]
    # The doc runs first and then keeps the batch: its index only grows as
    # its last tokens come near.
    out, gen, now = {"chat": 400, "doc": 10}, {}, 0.0
    for i in range(10):
        d, fin, now = step(core, now, out, gen)
        assert [e.job_id for e in d.batch] == ["doc"]
    assert fin == ["doc"]


def test_prefill_waits_for_a_running_job_about_to_finish():
    core = make_core("default", max_batch_size=4)
    teach(core, [(8, 3), (800, 50)])
    out, gen = {"short": 3, "long": 50}, {}
    core.add_job(JobSpec("short", 0, 8, 100), 0)
    d, _, now = step(core, 0.0, out, gen)  # short's prefill: 1 token out, 2 to go
    core.add_job(JobSpec("long", now, 800, 100), now)
    # 800 prompt tokens would make short's last two iterations 0.79 s longer:
    # the long prompt waits though the batch has room for it.
    d, fin, now = step(core, now, out, gen)
    assert [e.job_id for e in d.batch] == ["short"] and fin == []
    d, fin, now = step(core, now, out, gen)
    assert [e.job_id for e in d.batch] == ["short"] and fin == ["short"]
    d, _, now = step(core, now, out, gen)
    assert [(e.job_id, e.num_new_tokens) for e in d.batch] == [("long", 800)]


def test_prefill_does_not_wait_when_many_jobs_wait_behind_it():
    core = make_core("default", max_batch_size=4)
    teach(core, [(8, 3), (800, 50)])
    out, gen = {"short": 3}, {}
    core.add_job(JobSpec("short", 0, 8, 100), 0)
    _, _, now = step(core, 0.0, out, gen)
    # Every job in the queue would slip with the deferred prefill.
    for i in range(400):
        core.add_job(JobSpec(f"q{i}", now, 800, 100), now)
    d = core.schedule(now)
    assert [e.job_id for e in d.batch][0] == "short" and any(e.is_prefill for e in d.batch[1:])


def test_starving_job_is_promoted_after_the_patience_multiple():
    core = make_core("default", max_batch_size=1, starvation_threshold=1.0)
    assert core.starvation_threshold == GittinsPolicy.starvation_patience * 1.0
    # A long prompt expecting a long answer: a low index. One-token jobs keep
    # arriving, each worth more, and would take every iteration.
    teach(core, [(8, 1), (900, 1000)])
    out, gen = {"wait": 1000}, {}
    core.add_job(JobSpec("wait", 0.0, 900, 1000), 0.0)
    now, i = 0.0, 0
    while True:
        out[f"s{i}"] = 1
        core.add_job(JobSpec(f"s{i}", now, 8, 100), now)
        due = now >= core.starvation_threshold
        d, _, now = step(core, now, out, gen, elapsed=0.5)
        if due:
            break
        assert [e.job_id for e in d.batch] == [f"s{i}"] and core.job_level("wait") == 1
        i += 1
    assert [e.job_id for e in d.batch] == ["wait"] and core.stats.promotions == 1
    assert i == core.starvation_threshold / 0.5  # it waited the whole threshold, no longer


# ------------------------------------------------------------------ oracle
def test_oracle_orders_by_output_times_remaining_cost():
    # key = X * (prefill marginal + X * decode cost per token); LINEAR:
    # prefill marginal = 1 ms/token - 10 ms, decode 1 ms + 10 ms / batch per token.
    specs = [JobSpec("a", 0, 200, 100, 40), JobSpec("b", 0, 8, 100, 60), JobSpec("c", 0, 8, 100, 20)]
    core = make_core("oracle", max_batch_size=1)
    for spec in specs:
        core.add_job(spec, 0)
    keys = {s.job_id: core.policy.key(core._jobs[s.job_id])[0] for s in specs}
    assert keys["a"] == pytest.approx(40 * (0.19 + 40 * 0.011))
    assert keys["c"] < keys["a"] < keys["b"]
    order = run_all(make_core("oracle", max_batch_size=1), {"a": 40, "b": 60, "c": 20}, {0: specs})
    assert order == ["c", "a", "b"]


def test_oracle_defers_a_prefill_only_while_it_pays():
    core = make_core("oracle", max_batch_size=4)
    out, gen = {"d": 3, "p": 100}, {}
    core.add_job(JobSpec("d", 0, 8, 100, 3), 0)
    _, _, now = step(core, 0.0, out, gen)
    core.add_job(JobSpec("p", now, 800, 100, 100), now)
    # d (weight 1/3) finishes in 2 iterations of 11 ms: 0.79 s * 1/3 saved
    # against 22 ms * 1/100 lost.
    d, _, now = step(core, now, out, gen)
    assert [e.job_id for e in d.batch] == ["d"]
    # A decoder with 199 tokens to go (weight 1/200) is not worth waiting for.
    core2 = make_core("oracle", max_batch_size=4)
    core2.add_job(JobSpec("d", 0, 8, 600, 200), 0)
    _, _, now = step(core2, 0.0, {"d": 200}, {})
    core2.add_job(JobSpec("p", now, 800, 300, 300), now)
    assert [e.job_id for e in core2.schedule(now).batch] == ["d", "p"]


def test_oracle_needs_output_lengths():
    core = make_core("oracle")
    with pytest.raises(ValueError, match="needs output_len"):
        core.add_job(JobSpec("x", 0, 8, 100), 0)


# ------------------------------------------------------------------- bound
def test_bound_of_one_job_is_its_time_alone():
    # One job alone: prefill 100 tokens (0.1 s), then 4 decode steps of 11 ms.
    b = lower_bound([TraceJob(0.0, 100, 5)], LINEAR)
    assert b.alone_part == pytest.approx((0.1 + 4 * 0.011) / 5)
    assert b.mean_norm_latency == b.alone_part > b.busy_time_part


def test_bound_counts_contention():
    # 50 identical jobs at once: one machine must do all their work, so the
    # mean busy-time part grows with their number while the alone part does not.
    jobs = [TraceJob(0.0, 500, 20) for _ in range(50)]
    b = lower_bound(jobs, LINEAR, max_batch_size=8)
    assert b.busy_time_part > 5 * b.alone_part
    assert b.mean_norm_latency == b.busy_time_part


@pytest.mark.parametrize("mix,rate", [("rag", 1.5), ("chat", 5.0)])
def test_no_policy_beats_the_bound(mix, rate):
    jobs = synthetic(mix, 150, rate, seed=3)
    cost = CostModel.default()
    bound = lower_bound(jobs, cost).mean_norm_latency
    for policy in ("fcfs", "sj-mlfq", "srpt", "default", "oracle"):
        assert simulate(jobs, SimConfig(policy=policy), cost).metrics["mean_norm_latency"] >= bound, policy

