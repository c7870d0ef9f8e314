"""Why proactive KV placement has nothing to add under sustained memory pressure
(benchmarks/results/kv_placement.md). Runs the KV experiment once per KV policy with
counters hooked around the placement policy and the core, and prints one JSON object:

- per plan() with something swapped out: resident jobs, how many are idle (not in
  this iteration's batch: only those may be offloaded ahead of need), swapped jobs
  the walk wants now, and how often some swapped job has an earlier ENST than some
  idle resident (the precondition of an ENST exchange);
- per iteration: GPU blocks in use and blocks held by jobs whose KV is being copied
  (they cannot run), and jobs in the batch.

  python benchmarks/kv_placement_diag.py --rate 1.219 --gpu-kv-blocks 239
  python benchmarks/kv_placement_diag.py --profile benchmarks/results/services/h100_profile_small_quick.json \\
      --rate 9.374 --gpu-kv-blocks 458
"""
from __future__ import annotations

import argparse
import collections
import json

from fastserve.kvstore import placement
from fastserve.scheduler.core.scheduler import SchedulerCore
from fastserve.scheduler.core.cost_model import CostModel
from fastserve.scheduler.core.job import Loc
from fastserve.scheduler.sim.simulator import SimConfig, simulate
from fastserve.scheduler.sim.workload import synthetic


def run(args: argparse.Namespace, kv: str) -> dict:
    plans: collections.Counter = collections.Counter()
    iters: collections.Counter = collections.Counter()
    base = placement.KVPlacementPolicy

    def wrap(cls):
        orig = cls.plan

        def plan(self, view):
            if view.host_used:
                res, sw = view.resident(), view.swapped()
                idle = [c for c in res if not c.in_batch]
                plans["plans_with_swapped"] += 1
                plans["residents"] += len(res)
                plans["idle_residents"] += len(idle)
                plans["plans_with_an_idle_resident"] += bool(idle)
                plans["want_upload"] += len(view.want_upload)
                if idle and sw:
                    s = min(sw, key=lambda c: (c.enst, c.rank))
                    v = max(idle, key=lambda c: (c.enst, c.rank))
                    plans["exchange_precondition"] += v.later_than(s)
            return orig(self, view)
        return orig, plan

    classes = [c for c in vars(placement).values() if isinstance(c, type) and issubclass(c, base) and c is not base]
    saved = {}
    for cls in classes:
        if "plan" in vars(cls):
            saved[cls], cls.plan = wrap(cls)
    orig_schedule = SchedulerCore.schedule

    def schedule(self, now):
        d = orig_schedule(self, now)
        iters["iterations"] += 1
        iters["blocks_used"] += self.gpu.num_used
        iters["blocks_held_by_copies"] += sum(len(j.gpu_blocks) for loc in (Loc.TO_HOST, Loc.TO_GPU)
                                              for j in self._by_loc[loc].values())
        iters["batch_jobs"] += len(d.batch)
        return d
    SchedulerCore.schedule = schedule
    try:
        cost = CostModel.from_profile(args.profile) if args.profile else CostModel.default()
        jobs = synthetic("sharegpt", args.num_jobs, args.rate, cv=2.0, seed=args.seed)
        r = simulate(jobs, SimConfig(policy="sj-mlfq", kv_policy=kv, gpu_kv_blocks=args.gpu_kv_blocks,
                                     host_kv_blocks=args.host_kv_blocks, copy_bandwidth=args.copy_bandwidth), cost)
    finally:
        SchedulerCore.schedule = orig_schedule
        for cls, orig in saved.items():
            cls.plan = orig
    n, p = iters["iterations"], max(plans["plans_with_swapped"], 1)
    return {"mean_norm_latency": r.metrics["mean_norm_latency"], "swaps": r.metrics["swaps"], "iterations": n,
            "plans_with_swapped": plans["plans_with_swapped"],
            "mean_residents": plans["residents"] / p, "mean_idle_residents": plans["idle_residents"] / p,
            "share_of_plans_with_an_idle_resident": plans["plans_with_an_idle_resident"] / p,
            "share_of_plans_meeting_exchange_precondition": plans["exchange_precondition"] / p,
            "mean_swapped_jobs_wanted_now": plans["want_upload"] / p,
            "mean_batch_jobs": iters["batch_jobs"] / n, "mean_gpu_blocks_used": iters["blocks_used"] / n,
            "mean_gpu_blocks_held_by_copies": iters["blocks_held_by_copies"] / n}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--profile")
    ap.add_argument("--rate", type=float, required=True)
    ap.add_argument("--gpu-kv-blocks", type=int, required=True)
    ap.add_argument("--host-kv-blocks", type=int, default=100000)
    ap.add_argument("--copy-bandwidth", type=float, default=16e9)
    ap.add_argument("--num-jobs", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--kv-policy", default="proactive,reactive")
    args = ap.parse_args()
    out = {"profile": args.profile or "built-in CPU", "rate": args.rate, "gpu_kv_blocks": args.gpu_kv_blocks,
           "host_kv_blocks": args.host_kv_blocks, "copy_bandwidth": args.copy_bandwidth}
    for kv in args.kv_policy.split(","):
        out[kv] = run(args, kv)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
