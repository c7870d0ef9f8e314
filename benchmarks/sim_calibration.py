"""Where the simulator's mean JCT parts from the real stack's: replay one
`loadgen.py --spawn --sim --trace-out FILE` run through the simulator with
each modelling fix added in turn, and compare job by job.

    python benchmarks/sim_calibration.py FILE [--json OUT]

Steps (each keeps the ones above it):
  first      the first calibration: decode points from the run's pure-decode
             steps, prefill points from the offline profile, the loop's control
             overhead added to every point, the scheduler's quanta and
             skip-join levels from that same in-situ model
  own-model  the simulated scheduler decides by its own profile (--profile or
             the built-in one), as the service's scheduler does
  overhead   the control overhead advances the clock but is not charged to
             the jobs (the service charges the worker's step time)
  prefill    prefill cost fitted to this run's steps that held a prefill
             (this is what `loadgen.py --sim` reports as sim_in_situ)
Diagnostics, not a prediction (they use the run's own timeline):
  scaled     the offline profile times the run's mean speed (no in-situ shape)
  drift      `prefill` with the machine's measured drift replayed: per window
             of the run, real step time / the model's for the same batches
             multiplies the simulated steps that start in that window
Per step: mean JCT and its error against the real run, join levels equal to
the real scheduler's, and the iteration count; and, for the final timing
model, how well it predicts each real step (pure decode / with a prefill).
"""
from __future__ import annotations

import argparse
import json
import sys
from argparse import Namespace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from loadgen import (_Entry, fold_overhead, load_jobs, offline_profile, profile_from_steps,  # noqa: E402
                     sim_trace, simulate)


def variants(args, step_log, overhead):
    off = offline_profile(args)
    first = profile_from_steps(step_log, off, prefill="offline")
    final = profile_from_steps(step_log, off)
    return [
        ("first", fold_overhead(first, overhead), 0.0, "timing"),
        ("own-model", fold_overhead(first, overhead), 0.0, "scheduler"),
        ("overhead", first, overhead, "scheduler"),
        ("prefill", final, overhead, "scheduler"),
    ], final


def scaled_offline(iterations, args) -> dict:
    """The offline profile's shape at this run's mean speed: every point times
    (sum of real steps / sum of the offline model's steps for the same batches)."""
    off = offline_profile(args)
    k = drift(iterations, off, window=1e9)[0][1]
    return {**off, "prefill": [{**q, "seconds": q["seconds"] * k} for q in off["prefill"]],
            "decode": [{**q, "seconds": q["seconds"] * k} for q in off["decode"]], "scale": k}


def drift(iterations, profile, window: float = 2.0) -> list[tuple[float, float]]:
    """(start, real / model step time) per `window` seconds of the real run."""
    from fastserve.scheduler.core.cost_model import CostModel

    model = CostModel.from_dict(profile, source="in-situ")
    sums: dict[int, list[float]] = {}
    for it in iterations:
        w = sums.setdefault(int(it["t_sched"] // window), [0.0, 0.0])
        w[0] += it["charged"]
        w[1] += model.iteration_time([_Entry(bool(b[1]), b[2], b[3]) for b in it["batch"]])
    return [(0.0 if k == min(sums) else k * window, r / m) for k, (r, m) in sorted(sums.items())]


def step_fit(iterations, profile) -> dict:
    """Real step time over the timing model's prediction for the same batch."""
    from fastserve.scheduler.core.cost_model import CostModel

    model = CostModel.from_dict(profile, source="in-situ")
    kinds: dict[str, list[tuple[float, float]]] = {}
    for it in iterations:
        batch = [_Entry(bool(b[1]), b[2], b[3]) for b in it["batch"]]
        kind = "with prefill" if any(e.is_prefill for e in batch) else "pure decode"
        kinds.setdefault(kind, []).append((it["charged"], model.iteration_time(batch)))
    return {k: {"steps": len(v), "real_ms": 1e3 * float(np.mean([r for r, _ in v])),
                "model_ms": 1e3 * float(np.mean([m for _, m in v])),
                "real_over_model": float(sum(r for r, _ in v) / sum(m for _, m in v))} for k, v in kinds.items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("trace", help="JSON written by loadgen.py --spawn --trace-out")
    p.add_argument("--json", help="write the comparison here too")
    a = p.parse_args(argv)
    data = json.loads(Path(a.trace).read_text())
    args = Namespace(**data["args"])
    real = data["traces"]["real"]
    if real is None or not data["traces"].get("step_log"):
        p.error(f"{a.trace} has no real-run trace (run loadgen.py with --spawn --trace-out)")
    jobs = load_jobs(args)
    res = real["results"]
    real_jct = np.array([r["jct"] for r in res])
    real_levels = [j.get("join_level") for j in real["jobs"]]
    overhead = data["report"]["scheduler_loop"]["mean_control_overhead_ms"] / 1e3
    steps, final = variants(args, data["traces"]["step_log"], overhead)
    out = {"policy": args.policy, "real_mean_jct": float(real_jct.mean()), "real_iterations": len(real["iterations"]),
           "control_overhead_ms": overhead * 1e3, "prefill": final["prefill_source"], "steps": {}}
    steps.append(("scaled", scaled_offline(real["iterations"], args), overhead, "scheduler"))
    steps.append(("drift", final, overhead, "scheduler"))
    for name, prof, ovh, sched in steps:
        slow = drift(real["iterations"], prof) if name == "drift" else None
        if slow:
            out["drift_factors"] = [round(f, 2) for _, f in slow]
        tr = sim_trace(simulate(jobs, args.policy, args, prof, ovh, sched, slow))
        jct = np.array([j["jct"] for j in tr["jobs"]])
        out["steps"][name] = {
            "mean_jct": float(jct.mean()), "error_vs_real": float((jct.mean() - real_jct.mean()) / real_jct.mean()),
            "join_levels_equal": sum(r == j["join_level"] for r, j in zip(real_levels, tr["jobs"])),
            "iterations": tr["iterations"],
            "per_job_abs_error_mean_s": float(np.abs(jct - real_jct).mean())}
    out["step_fit"] = step_fit(real["iterations"], final)
    text = json.dumps(out, indent=1)
    print(text)
    if a.json:
        Path(a.json).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
