"""Scheduling policies over workload mixes x arrival rates (issue 13), in the
simulator with the built-in CPU cost model, Poisson arrivals.

    python benchmarks/policy_sweep.py --out benchmarks/results/policies/sweep.json \
        --plots benchmarks/results/policies

Per mix: first the rate at which fcfs's mean normalized latency reaches the
SLO (bisection, seed 0), then every policy at fractions of that rate, from
light load to that rate and one step beyond (--fractions). Each cell is the
mean over --seeds runs of --num-jobs jobs, beside the lower bound
(scheduler/sim/bound.py) of the same traces. Checked per cell, baselines from
the same run:
  - default <= 1.0 x fcfs and <= 1.3 x oracle (mean normalized latency);
  - on chat mixes, at fcfs's SLO rate: fcfs / default >= 3.
Prints one markdown table per mix and the cells that miss a target; writes
JSON (every cell, every seed) and one PNG per mix (needs matplotlib).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from multiprocessing import Pool
from pathlib import Path

import numpy as np

from fastserve.scheduler.core.cost_model import CostModel
from fastserve.scheduler.sim.bound import lower_bound
from fastserve.scheduler.sim.simulator import SimConfig, simulate
from fastserve.scheduler.sim.sweep import max_rate_at_slo
from fastserve.scheduler.sim.workload import make_workload

POLICIES = ("fcfs", "sj-mlfq", "default", "oracle")
# `default-informed`: `default` whose output-length model has already seen
# INFORMED_JOBS jobs of the mix's own distribution (another seed): what
# knowing the distribution exactly, rather than learning it, would buy.
INFORMED_JOBS = 20000
CHAT_MIXES = ("chat", "sharegpt-cv2", "alpaca-cv2")
MAX_VS_FCFS, MAX_VS_ORACLE, MIN_CHAT_GAIN = 1.0, 1.3, 3.0


def workload(mix: str, rate: float, n: int, seed: int):
    """`name` or `name-cvX` (a preset with output-length CV X)."""
    name, _, cv = mix.partition("-cv")
    return make_workload(name, num_jobs=n, rate=rate, cv=float(cv) if cv else None, seed=seed)


def run_cell(task: tuple) -> tuple:
    mix, rate, policy, n, seed, core = task
    prepare = None
    if policy == "default-informed":
        policy = "default"

        def prepare(c) -> None:
            for j in workload(mix, 1.0, INFORMED_JOBS, 1000 + seed):
                c.policy.lengths.observe(j.input_len, j.output_len)

    m = simulate(workload(mix, rate, n, seed), SimConfig(policy=policy, core=dict(core)), CostModel.default(),
                 prepare=prepare).metrics
    return task, {k: m[k] for k in ("mean_norm_latency", "p95_norm_latency", "mean_ttft", "throughput", "slo")}


def fcfs_slo_rate(task: tuple) -> tuple[str, dict]:
    mix, n, core = task

    def run(rate: float) -> dict:
        return run_cell((mix, rate, "fcfs", n, 0, core))[1]

    slo = run(1.0)["slo"]
    return mix, max_rate_at_slo(run, slo, 1.0, factor=1.25, max_expand=20, bisect_steps=5) | {"slo": slo}


def bound_cell(task: tuple) -> tuple:
    mix, rate, n, seed = task
    return task, lower_bound(workload(mix, rate, n, seed), CostModel.default()).mean_norm_latency


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--mixes", default="chat,summarization,rag,code,sharegpt-cv2,alpaca-cv2")
    p.add_argument("--policies", default=",".join(POLICIES),
                   help=f"from {', '.join(POLICIES)}, default-informed (and any other policy name)")
    p.add_argument("--fractions", default="0.25,0.5,0.75,0.9,1.0,1.1",
                   help="rates as fractions of fcfs's SLO rate; 1.0 = where fcfs reaches the SLO")
    p.add_argument("--num-jobs", type=int, default=800)
    p.add_argument("--seeds", type=int, default=1, help="runs per cell (seeds 0..N-1), averaged")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel simulations")
    p.add_argument("--starvation-threshold", type=float, default=None,
                   help="s (default: the core's); a huge value switches starvation promotion off")
    p.add_argument("--out", help="JSON file")
    p.add_argument("--plots", help="directory for one PNG per mix")
    args = p.parse_args(argv)
    mixes = args.mixes.split(",")
    policies = args.policies.split(",")
    fractions = [float(x) for x in args.fractions.split(",")]
    # Extra SchedulerCoreConfig fields, as a hashable tuple of pairs (part of each cell's key).
    core = () if args.starvation_threshold is None else (("starvation_threshold", args.starvation_threshold),)
    t0 = time.time()
    with Pool(args.jobs) as pool:
        anchors = dict(pool.map(fcfs_slo_rate, [(m, args.num_jobs, core) for m in mixes]))
        cells = [(m, anchors[m]["max_rate_at_slo"] * f, pol, args.num_jobs, s, core)
                 for m in mixes for f in fractions for pol in policies for s in range(args.seeds)]
        results = dict(pool.map(run_cell, cells, chunksize=1))
        bounds = dict(pool.map(bound_cell, sorted({(m, r, n, s) for m, r, _, n, s, _ in cells})))
    report: dict = {"command": " ".join([Path(sys.argv[0]).as_posix()] + (argv if argv is not None else sys.argv[1:])),
                    "cost_model": "built-in CPU profile (small model)", "num_jobs": args.num_jobs,
                    "seeds": args.seeds, "policies": policies, "fractions": fractions, "core": dict(core),
                    "targets": {"default_vs_fcfs_max": MAX_VS_FCFS, "default_vs_oracle_max": MAX_VS_ORACLE,
                                "chat_gain_at_fcfs_slo_min": MIN_CHAT_GAIN},
                    "targets_checked": {"default", "fcfs", "oracle"} <= set(policies), "mixes": {}, "misses": []}
    for m in mixes:
        rows = []
        for f in fractions:
            rate = anchors[m]["max_rate_at_slo"] * f
            per = {}
            for pol in policies:
                runs = [results[(m, rate, pol, args.num_jobs, s, core)] for s in range(args.seeds)]
                per[pol] = {"mean": float(np.mean([r["mean_norm_latency"] for r in runs])),
                            "p95": float(np.mean([r["p95_norm_latency"] for r in runs])),
                            "per_seed_mean": [r["mean_norm_latency"] for r in runs],
                            "throughput": float(np.mean([r["throughput"] for r in runs]))}
            bound = float(np.mean([bounds[(m, rate, args.num_jobs, s)] for s in range(args.seeds)]))
            row = {"fraction": f, "rate": rate, "policies": per, "lower_bound": bound}
            if {"default", "fcfs", "oracle"} <= set(per):
                d, fc, orc = per["default"]["mean"], per["fcfs"]["mean"], per["oracle"]["mean"]
                row["default_vs_fcfs"], row["default_vs_oracle"] = d / fc, d / orc
                checks = [("default <= 1.0 x fcfs", d / fc, d / fc <= MAX_VS_FCFS),
                          ("default <= 1.3 x oracle", d / orc, d / orc <= MAX_VS_ORACLE)]
                if m in CHAT_MIXES and f == 1.0:
                    checks.append(("chat mix at fcfs's SLO rate: fcfs / default >= 3", fc / d, fc / d >= MIN_CHAT_GAIN))
                for what, value, ok in checks:
                    if not ok:
                        report["misses"].append({"mix": m, "fraction": f, "rate": rate, "target": what,
                                                 "value": value})
            rows.append(row)
        report["mixes"][m] = {"fcfs_slo_rate": anchors[m]["max_rate_at_slo"], "slo": anchors[m]["slo"],
                              "fcfs_search": anchors[m]["points"], "cells": rows}
        if args.plots:
            from fastserve.scheduler.sim.plot import plot_sweep

            Path(args.plots).mkdir(parents=True, exist_ok=True)
            plot_sweep(str(Path(args.plots) / f"{m}.png"),
                       f"{m}: fcfs reaches the SLO at {anchors[m]['max_rate_at_slo']:.3f} req/s "
                       f"({args.num_jobs} jobs, {args.seeds} seed(s), CPU profile)",
                       [r["rate"] for r in rows],
                       {pol: ([r["policies"][pol]["mean"] for r in rows], [r["policies"][pol]["p95"] for r in rows])
                        for pol in policies},
                       [r["lower_bound"] for r in rows], anchors[m]["slo"])
    report["wall_s"] = time.time() - t0
    print(markdown(report))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    return 0


def markdown(report: dict) -> str:
    pols = report["policies"]
    lines = []
    for m, mx in report["mixes"].items():
        lines += [f"**{m}** (fcfs reaches the SLO {mx['slo']:.3f} s/token at {mx['fcfs_slo_rate']:.3f} req/s)", "",
                  "| x fcfs SLO rate | rate (req/s) | " + " | ".join(f"{p} mean / P95" for p in pols)
                  + " | lower bound | default / fcfs | default / oracle |",
                  "|---" * (len(pols) + 5) + "|"]
        for r in mx["cells"]:
            cells = " | ".join(f"{r['policies'][p]['mean']:.4f} / {r['policies'][p]['p95']:.3f}" for p in pols)
            ratios = (f"{r['default_vs_fcfs']:.2f}x | {r['default_vs_oracle']:.2f}x"
                      if "default_vs_fcfs" in r else "- | -")
            lines.append(f"| {r['fraction']:.2f} | {r['rate']:.3f} | {cells} | {r['lower_bound']:.4f} | {ratios} |")
        lines.append("")
    if not {"default", "fcfs", "oracle"} <= set(pols):
        lines.append("Targets not checked: they need fcfs, default and oracle in the same run.")
        return "\n".join(lines)
    lines.append("Cells that miss a target:" if report["misses"] else "Every cell meets every target.")
    for x in report["misses"]:
        lines.append(f"- {x['mix']} at {x['fraction']:.2f} x ({x['rate']:.3f} req/s): {x['target']}: "
                     f"{x['value']:.2f}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
