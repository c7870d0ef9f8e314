"""Workloads: synthetic lengths and arrivals, JSONL traces and their errors."""
from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest

from fastserve.scheduler.core.cost_model import CostModel, ProfileError
from fastserve.scheduler.sim.mixes import FAMILIES, MIXES, sample_family
from fastserve.scheduler.sim.workload import TraceError, arrivals, load_trace, make_workload, synthetic


def test_synthetic_sharegpt_matches_published_means_and_caps():
    jobs = synthetic("sharegpt", 20000, 2.0, cv=1.0, seed=1)
    inp = np.array([j.input_len for j in jobs])
    out = np.array([j.output_len for j in jobs])
    assert abs(inp.mean() - 161) / 161 < 0.05  # the cap at 1024 barely bites with cv 1
    assert abs(out.mean() - 338) / 338 < 0.06
    assert inp.max() <= 1024 and (inp + out).max() <= 2048 and out.min() >= 1
    ts = [j.arrival_time for j in jobs]
    assert ts == sorted(ts) and abs(len(ts) / ts[-1] - 2.0) < 0.1


def test_output_cv_controls_the_tail():
    lo = np.array([j.output_len for j in synthetic("alpaca", 20000, 1.0, cv=0.5, seed=2)])
    hi = np.array([j.output_len for j in synthetic("alpaca", 20000, 1.0, cv=2.0, seed=2)])
    assert 0.4 < lo.std() / lo.mean() < 0.6
    assert hi.std() / hi.mean() > 1.5


def test_gamma_arrivals_cv():
    rng = np.random.default_rng(0)
    gaps = np.diff([0.0] + arrivals(rng, 20000, 4.0, cv=3.0))
    assert abs(gaps.mean() - 0.25) < 0.02 and 2.6 < gaps.std() / gaps.mean() < 3.4


def test_trace_with_and_without_arrival_times(tmp_path):
    p = tmp_path / "t.jsonl"
    p.write_text('{"arrival_time": 1.5, "input_len": 10, "output_len": 5}\n\n'
                 '{"arrival_time": 0.5, "input_len": 3, "output_len": 7}\n')
    jobs = load_trace(p)
    assert [(j.arrival_time, j.input_len, j.output_len) for j in jobs] == [(0.5, 3, 7), (1.5, 10, 5)]
    p.write_text('{"input_len": 10, "output_len": 5}\n{"input_len": 3, "output_len": 7}\n')
    with pytest.raises(TraceError, match="--rate"):
        load_trace(p)
    jobs = make_workload(str(p), num_jobs=10, rate=2.0)
    assert [j.input_len for j in jobs] == [10, 3] and jobs[0].arrival_time < jobs[1].arrival_time


@pytest.mark.parametrize("line,msg", [
    ("{not json", ":1: not JSON"),
    ("[1, 2]", "expected a JSON object"),
    ('{"input_len": 4}', "missing field 'output_len'"),
    ('{"input_len": -4, "output_len": 3}', "input_len must be a positive integer"),
    ('{"input_len": 4, "output_len": 0}', "output_len must be a positive integer"),
    ('{"input_len": 4.5, "output_len": 3}', "input_len must be a positive integer"),
    ('{"input_len": true, "output_len": 3}', "input_len must be a positive integer"),
    ('{"arrival_time": -1, "input_len": 4, "output_len": 3}', "arrival_time must be"),
    ('{"input_len": 2000, "output_len": 100}', "exceeds 2048"),
])
def test_malformed_trace_lines(tmp_path, line, msg):
    p = tmp_path / "bad.jsonl"
    p.write_text(line + "\n")
    with pytest.raises(TraceError, match=msg):
        load_trace(p, rate=1.0)


def test_bad_workload_arguments(tmp_path):
    with pytest.raises(ValueError, match="unknown workload"):
        make_workload("wikipedia", num_jobs=5, rate=1.0)
    with pytest.raises(ValueError, match="rate must be > 0"):
        synthetic("alpaca", 5, -1.0)
    with pytest.raises(TraceError, match="no jobs"):
        (tmp_path / "e.jsonl").write_text("\n")
        load_trace(tmp_path / "e.jsonl")


def test_cost_model_interpolates_and_rejects_bad_profiles(tmp_path):
    prof = {"model": "m", "device": "cpu", "block_size": 16,
            "prefill": [{"tokens": 100, "seconds": 0.1}, {"tokens": 300, "seconds": 0.5}],
            "decode": [{"batch_size": b, "context_len": c, "seconds": 0.01 + 0.002 * b + 1e-6 * b * c}
                       for b in (1, 4, 16) for c in (100, 1000)]}
    p = tmp_path / "p.json"
    p.write_text(json.dumps(prof))
    cm = CostModel.from_profile(p)
    assert cm.prefill_time(200) == pytest.approx(0.3)
    assert cm.prefill_time(400) == pytest.approx(0.7)  # linear extrapolation
    assert cm.decode_time(8, 500) == pytest.approx(0.01 + 0.016 + 0.004)
    d = CostModel.default()
    assert d.prefill_time(1024) > d.prefill_time(161) > d.decode_time(8, 512) > 0
    p.write_text(json.dumps({**prof, "prefill": []}))
    with pytest.raises(ProfileError):
        CostModel.from_profile(p)
    p.write_text("{")
    with pytest.raises(ProfileError, match="cannot read"):
        CostModel.from_profile(p)


def test_iteration_time_pays_attention_per_sequence():
    from fastserve.scheduler.core.types import BatchEntry

    cm = CostModel.default()
    one = cm.iteration_time([BatchEntry("a", True, 512, 0, [])])
    four = cm.iteration_time([BatchEntry(str(i), True, 512, 0, []) for i in range(4)])
    assert one == pytest.approx(cm.prefill_time(512))
    assert four == pytest.approx(cm.overhead + 4 * (one - cm.overhead))
    assert four < cm.prefill_time(2048)  # not quadratic in the batch's total tokens
    # Two chunks cost what the whole prompt costs, plus one more overhead.
    chunks = cm.iteration_time([BatchEntry("a", True, 256, 0, [])]) + \
        cm.iteration_time([BatchEntry("a", True, 256, 256, [])])
    assert chunks == pytest.approx(one + cm.overhead)
    dec = [BatchEntry(str(i), False, 1, 99, []) for i in range(8)]
    assert cm.iteration_time(dec) == pytest.approx(cm.decode_time(8, 100))
    assert cm.iteration_time([]) == 0.0


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_family_lengths_match_their_stated_means_and_correlation(name):
    fam = FAMILIES[name]
    inp, out = sample_family(np.random.default_rng(7), fam, 40000, 2048)
    # Clipping to the context cuts the upper tail, so the realised means sit a
    # little below the nominal ones (at most ~3% for these families).
    assert -0.05 < inp.mean() / fam.input_mean - 1 < 0.01
    assert -0.05 < out.mean() / fam.output_mean - 1 < 0.02
    assert abs(np.corrcoef(np.log(inp), np.log(out))[0, 1] - fam.rho) < 0.04
    assert inp.min() >= fam.min_input and inp.max() <= fam.max_input
    assert out.min() >= 1 and (inp + out).max() <= 2048


def test_correlation_is_what_rho_says():
    base = FAMILIES["summary"]
    lo = sample_family(np.random.default_rng(1), replace(base, rho=0.0), 20000, 2048)
    hi = sample_family(np.random.default_rng(1), replace(base, rho=0.8), 20000, 2048)
    assert abs(np.corrcoef(np.log(lo[0]), np.log(lo[1]))[0, 1]) < 0.03
    assert np.corrcoef(np.log(hi[0]), np.log(hi[1]))[0, 1] > 0.75


@pytest.mark.parametrize("mix", sorted(MIXES))
def test_mixes_blend_their_families_in_the_stated_shares(mix):
    jobs = synthetic(mix, 20000, 3.0, seed=4)
    inp = np.array([j.input_len for j in jobs])
    out = np.array([j.output_len for j in jobs])
    shares = MIXES[mix]
    expect_in = sum(s * FAMILIES[f].input_mean for f, s in shares.items())
    expect_out = sum(s * FAMILIES[f].output_mean for f, s in shares.items())
    assert -0.05 < inp.mean() / expect_in - 1 < 0.02
    assert -0.05 < out.mean() / expect_out - 1 < 0.03
    # Each family's share shows in the share of short prompts.
    rng = np.random.default_rng(5)
    short = sum(s * (sample_family(rng, FAMILIES[f], 20000, 2048)[0] < 100).mean() for f, s in shares.items())
    assert abs((inp < 100).mean() - short) < 0.02
    ts = [j.arrival_time for j in jobs]
    assert abs(len(ts) / ts[-1] - 3.0) < 0.1


def test_mixes_take_no_output_cv():
    with pytest.raises(ValueError, match="mix of request families"):
        synthetic("rag", 10, 1.0, cv=2.0)
    assert len(make_workload("code", num_jobs=10, rate=1.0)) == 10
