"""The simulator keeps apart what the scheduler believes (its own cost model)
from what iterations cost (the clock), and the engine's step from the serving
loop's control overhead (the clock pays it, the jobs' MLFQ charge does not),
as the scheduler service does. And the in-situ profile loadgen builds from a
run's steps recovers the step costs it was made from."""
import importlib.util
import sys
from pathlib import Path

import pytest

from fastserve.scheduler.core.cost_model import CostModel
from fastserve.scheduler.sim.simulator import SimConfig, simulate
from fastserve.scheduler.sim.workload import TraceJob


def _model(decode=0.010, prefill_fixed=0.010, per_token=0.001) -> CostModel:
    # Decode steps cost `decode` whatever the batch; a prefill of T tokens
    # costs decode + prefill_fixed + per_token * T (the overhead is decode).
    return CostModel(prefill_tokens=(1.0, 100.0),
                     prefill_seconds=(decode + prefill_fixed + per_token, decode + prefill_fixed + per_token * 100),
                     decode_coef=(decode, 0.0, 0.0))


JOB = [TraceJob(0.0, 10, 20)]


def test_control_overhead_advances_the_clock_but_is_not_charged():
    cost = _model()
    plain = simulate(JOB, SimConfig(policy="sj-mlfq"), cost)
    apart = simulate(JOB, SimConfig(policy="sj-mlfq", control_overhead=0.005), cost)
    # Every one of the 20 iterations takes 5 ms longer...
    assert apart.records[0].finish == pytest.approx(plain.records[0].finish + 20 * 0.005)
    assert apart.records[0].first_token == pytest.approx(plain.records[0].first_token + 0.005)
    # ...but the job is charged the same, so it is demoted the same number of
    # times: a 30 ms prefill joins Q2 (40 ms), charged 30 ms + 10 ms per
    # decode: out of Q2 after 3 iterations, out of Q3 (80 ms) after 9 more, 8 left in Q4.
    assert apart.metrics["demotions"] == plain.metrics["demotions"] == 2
    # Folding the overhead into the step cost (the scheduler then charges it:
    # 35 ms, then 15 per decode) demotes once more: 2 in Q2, 6 in Q3, 11 in Q4 (160 ms), 1 left.
    folded = _model(decode=0.015)
    assert simulate(JOB, SimConfig(policy="sj-mlfq"), folded, policy_cost=cost).metrics["demotions"] == 3


def test_scheduler_decides_by_its_own_cost_model():
    own = _model()  # q0 = 10 ms; a 10-token prefill is predicted at 30 ms: joins Q2 (40 ms)
    slow = _model(decode=0.030, prefill_fixed=0.100)  # the iterations as the run measured them
    assert simulate(JOB, SimConfig(policy="sj-mlfq"), own).records[0].join_queue == 2
    timed_by_slow = simulate(JOB, SimConfig(policy="sj-mlfq"), slow)
    assert timed_by_slow.records[0].join_queue == 3  # 140 ms prefill vs q0 = 30 ms
    r = simulate(JOB, SimConfig(policy="sj-mlfq"), slow, policy_cost=own)
    assert r.records[0].join_queue == 2
    assert r.slo == pytest.approx(10 * 0.010)  # the SLO (and starvation threshold) follow the scheduler's q0
    # The clock follows the timing model: prefill 30 + 100 + 10 ms, then 19 decodes of 30 ms.
    assert r.records[0].finish == pytest.approx(0.140 + 19 * 0.030)
    assert r.job_iterations["j0"] == [20, 1]


def test_negative_control_overhead_is_refused():
    with pytest.raises(ValueError, match="control_overhead"):
        simulate(JOB, SimConfig(control_overhead=-0.001), _model())


def _loadgen():
    path = Path(__file__).resolve().parent.parent / "benchmarks" / "loadgen.py"
    spec = importlib.util.spec_from_file_location("loadgen_under_test", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # its dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def test_in_situ_profile_recovers_the_step_costs():
    lg = _loadgen()
    a, b, c, fixed, per_token = 0.012, 0.0015, 3e-6, 0.008, 0.001

    def step(prefill_tokens, n_dec, ctx):
        t = a + b * n_dec + c * n_dec * ctx + (fixed + per_token * prefill_tokens if prefill_tokens else 0.0)
        return (prefill_tokens, n_dec, n_dec * ctx, t)

    log = [step(0, n, ctx) for n in (1, 2, 4, 8) for ctx in (40, 120, 300)]
    log += [step(p, n, 80) for p, n in ((10, 0), (25, 3), (60, 7), (130, 5), (200, 1), (40, 6))]
    offline = {"block_size": 16, "prefill": [{"tokens": 16, "seconds": 0.001}, {"tokens": 128, "seconds": 0.002}],
               "decode": [{"batch_size": 1, "context_len": 64, "seconds": 0.001}]}
    prof = lg.profile_from_steps(log, offline)
    assert prof["prefill_source"].startswith("in-situ fit of 6 steps")
    model = CostModel.from_dict(prof)
    assert model.decode_time(5, 200) == pytest.approx(a + 5 * b + 5 * 200 * c)
    assert model.prefill_time(90) == pytest.approx(a + fixed + per_token * 90)
    # Too few steps with a prefill, or asked to: the offline prefill points stay.
    kept = lg.profile_from_steps(log[:-2], offline, min_prefill_steps=5)
    assert kept["prefill"] == offline["prefill"] and kept["prefill_source"] == "offline"
    assert lg.profile_from_steps(log, offline, prefill="offline")["prefill"] == offline["prefill"]
    assert lg.profile_from_steps([s for s in log if s[0]], offline) is None  # no pure decode step: no profile


def test_slowdown_replays_a_drifting_machine():
    cost = _model()
    plain = simulate(JOB, SimConfig(policy="sj-mlfq"), cost)
    # Twice as slow from 0.095 s on: the prefill (30 ms) and the decodes that
    # start before (7 of 10 ms, at 0.03 ... 0.09) keep their cost.
    slow = simulate(JOB, SimConfig(policy="sj-mlfq", slowdown=[(0.0, 1.0), (0.095, 2.0)]), cost)
    assert slow.records[0].finish == pytest.approx(0.030 + 7 * 0.010 + 12 * 0.020)
    assert plain.records[0].finish == pytest.approx(0.030 + 19 * 0.010)
    # The scheduler is charged the slowed steps (the service charges measured
    # ones): Q2 for 3 iterations, Q3 for 7 (50 + 40 ms > 80), 10 x 20 ms > Q4's 160.
    assert slow.metrics["demotions"] == 3
    with pytest.raises(ValueError, match="slowdown"):
        simulate(JOB, SimConfig(slowdown=[(1.0, 1.0), (0.5, 2.0)]), cost)


def test_decode_fit_is_constrained_not_clipped():
    # Points where the free fit wants a negative per-job cost: one-job steps
    # measured while the machine was slow. Clipping that fit's b to 0 kept its
    # a and c and over-predicted every point; the constrained fit stays unbiased.
    pts = [(1, 300, 0.046), (1, 350, 0.050), (2, 300, 0.040), (8, 100, 0.030), (8, 120, 0.032), (6, 90, 0.027)]
    model = CostModel.from_dict({"block_size": 16, "prefill": [{"tokens": 16, "seconds": 0.01}],
                                 "decode": [{"batch_size": b, "context_len": c, "seconds": s} for b, c, s in pts]})
    a, b, c = model.decode_coef
    assert b >= 0 and c >= 0
    pred = [model.decode_time(bb, cc) for bb, cc, _ in pts]
    assert sum(pred) == pytest.approx(sum(s for *_, s in pts))  # the intercept keeps the mean
    # On clean points the fit is exact.
    clean = [(bb, cc, 0.01 + 0.001 * bb + 2e-6 * bb * cc) for bb in (1, 4, 16) for cc in (64, 512)]
    exact = CostModel.from_dict({"block_size": 16, "prefill": [{"tokens": 16, "seconds": 0.01}],
                                 "decode": [{"batch_size": b, "context_len": c, "seconds": s} for b, c, s in clean]})
    assert exact.decode_coef == pytest.approx((0.01, 0.001, 2e-6))


def test_prefill_cost_never_falls_with_prompt_length():
    # A jittery launch-bound GPU profile whose points fall with length must not
    # extrapolate to ~0 s for long prompts (skip-join would put them in Q0).
    model = CostModel.from_dict({"block_size": 16,
                                 "prefill": [{"tokens": 16, "seconds": 0.010}, {"tokens": 64, "seconds": 0.007},
                                             {"tokens": 128, "seconds": 0.004}],
                                 "decode": [{"batch_size": 1, "context_len": 64, "seconds": 0.006}]})
    times = [model.prefill_time(t) for t in (16, 32, 64, 128, 1024, 2048)]
    assert times == sorted(times)
    assert times[-1] >= 0.010
