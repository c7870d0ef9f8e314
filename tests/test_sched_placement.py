"""KV placement policies: ENST ordering of offloads, uploads and drops."""
from __future__ import annotations

import pytest

from fastserve.kvstore.placement import Cand, PlacementView, make_kv_policy


def view(free=2, pending=0, free_host=100, host_used=0, blocked=(), want=(), resident=(), swapped=(), total=100):
    return PlacementView(num_gpu_blocks=total, free_gpu=free, pending_free_gpu=pending, free_host=free_host,
                         host_used=host_used, blocked=list(blocked), want_upload=list(want),
                         candidates=lambda: (list(resident), list(swapped)))


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
