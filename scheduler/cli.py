"""`fastserve sim` and `fastserve bench scheduler`. (`fastserve scheduler`,
the service, is registered by src/fastserve/launcher.py.)"""
from __future__ import annotations

import argparse
import json
import sys


def register(subparsers) -> None:
    p = subparsers.add_parser("sim", help="simulate scheduling policies on a workload (no model needed)",
                              description="Discrete-event simulation of the scheduler core.")
    p.add_argument("--policy", default="default,sj-mlfq,mlfq,fcfs,srpt,oracle",
                   help="comma-separated: default (= gittins), gittins, sj-mlfq, mlfq, fcfs, srpt, oracle "
                        "(default: all but gittins)")
    p.add_argument("--kv-policy", default="proactive", help="proactive | reactive | recompute | none")
    p.add_argument("--workload", default="sharegpt",
                   help="sharegpt | alpaca | longprompt (presets), chat | summarization | rag | code "
                        "(mixes of request families, scheduler/sim/mixes.py) | PATH.jsonl")
    p.add_argument("--rate", type=float, default=None, help="arrival rate, req/s (start point of --sweep-rates)")
    p.add_argument("--num-jobs", type=int, default=1000)
    p.add_argument("--cv", type=float, default=None,
                   help="coefficient of variation of a preset's output lengths (default 1; mixes have their own)")
    p.add_argument("--arrival-cv", type=float, default=1.0, help="CV of Gamma inter-arrival gaps (1: Poisson)")
    p.add_argument("--gpu-kv-blocks", type=int, default=None, help="GPU KV pool size (default: unconstrained)")
    p.add_argument("--host-kv-blocks", type=int, default=None, help="host KV pool size (default: 4x GPU)")
    p.add_argument("--copy-bandwidth", type=float, default=16e9, help="KV copy bandwidth, bytes/s per direction")
    p.add_argument("--watermark", type=float, default=0.05, help="proactive: offload below this free fraction")
    p.add_argument("--reserve", type=float, default=0.10, help="proactive: uploads keep this free fraction")
    p.add_argument("--pipeline-parallel-size", type=int, default=1,
                   help="pipeline stages of the replica (P batches in the pipe; stage bubbles simulated)")
    p.add_argument("--stage-transfer", type=float, default=0.0, help="seconds per pipeline hop (activations)")
    p.add_argument("--max-batch-size", type=int, default=32)
    p.add_argument("--max-tokens-per-batch", type=int, default=2048)
    p.add_argument("--num-queues", type=int, default=10)
    p.add_argument("--quantum-ratio", type=float, default=2.0)
    p.add_argument("--base-quantum", type=float, default=None, help="Q0 quantum, s (default: one decode iteration)")
    p.add_argument("--starvation-threshold", type=float, default=None, help="s without running before promotion")
    p.add_argument("--slo", type=float, default=None, help="mean normalized latency SLO, s/token (default 10x decode)")
    p.add_argument("--profile", default=None, help="cost profile JSON from `fastserve profile` (default: built-in)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sweep-rates", action="store_true", help="find each policy's highest rate within the SLO")
    p.add_argument("--json", action="store_true", help="print one JSON object keyed by policy name")
    p.add_argument("--plot", default=None, metavar="OUT.png", help="draw latency-vs-rate and JCT CDF (matplotlib)")
    p.add_argument("--out", default=None, metavar="OUT.json",
                   help="write the JSON here, and beside it OUT.png (with --sweep-rates: normalized latency and TTFT "
                        "against rate per policy, SLO line) and OUT.occupancy.png (jobs per queue over the first "
                        "policy's run); plots need matplotlib (pip install 'fastserve[plot]')")
    p.set_defaults(func=_sim_main)

    b = subparsers.add_parser("bench", help="benchmarks (scheduler)")
    bsub = b.add_subparsers(dest="bench_target", metavar="TARGET")
    bsub.required = True
    s = bsub.add_parser("scheduler", help="cost of one schedule()+update() against the number of waiting jobs")
    s.add_argument("--waiting", default="1000,10000,100000", help="comma-separated waiting-job counts")
    s.add_argument("--batch", type=int, default=32)
    s.add_argument("--policy", default="sj-mlfq", help="any policy but the simulation-only srpt and oracle")
    s.add_argument("--kv-policy", default="proactive")
    s.add_argument("--iterations", type=int, default=2000)
    s.add_argument("--regime", default="default,pressure",
                   help="default (GPU pool of 4096 blocks) and/or pressure (1024 blocks, slow copies: hundreds of "
                        "jobs swapped, copies always in flight)")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=_bench_main)


def _csv_ints(text: str, what: str) -> list[int]:
    try:
        vals = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise SystemExit(f"{what}: expected comma-separated integers, got {text!r}")
    if not vals or any(v < 1 for v in vals):
        raise SystemExit(f"{what}: expected positive integers, got {text!r}")
    return vals


def _bench_main(args: argparse.Namespace) -> int:
    from fastserve.scheduler.sim.bench import bench_scheduler

    sizes = _csv_ints(args.waiting, "--waiting")
    try:
        regimes = tuple(x.strip() for x in args.regime.split(",") if x.strip())
        res = bench_scheduler(sizes, args.batch, regimes, policy=args.policy, kv_policy=args.kv_policy,
                              iterations=args.iterations)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(res, indent=2))
    else:
        print(f"policy {res['policy']}, kv {res['kv_policy']}, batch {res['batch']}: one schedule()+update()")
        for regime in regimes:
            print(f" {regime}:")
            for n, r in res[regime]["waiting"].items():
                print(f"  waiting {int(n):>7}: p50 {r['p50_us']:8.1f} us   p99 {r['p99_us']:8.1f} us   "
                      f"(CPU p99 {r['cpu_p99_us']:8.1f} us)   swapped {r['mean_jobs_swapped']:6.1f}   "
                      f"snapshot p99 {r['snapshot_p99_us']:8.1f} us")
            print(f"  p99 growth, largest vs smallest: {res[regime]['p99_ratio_largest_vs_smallest']:.2f}x "
                  f"(snapshot {res[regime]['snapshot_p99_ratio_largest_vs_smallest']:.2f}x)")
    return 0


def _sim_main(args: argparse.Namespace) -> int:
    from fastserve.scheduler.core.placement import KV_POLICY_NAMES

    from fastserve.scheduler.core.cost_model import CostModel, ProfileError
    from fastserve.scheduler.core.policies import POLICY_NAMES
    from fastserve.scheduler.sim.bound import lower_bound
    from fastserve.scheduler.sim.simulator import SimConfig, simulate
    from fastserve.scheduler.sim.sweep import max_rate_at_slo
    from fastserve.scheduler.sim.workload import PRESETS, TraceError, make_workload

    def fail(msg: str) -> int:
        print(f"error: {msg}", file=sys.stderr)
        return 2

    policies = [x.strip() for x in args.policy.split(",") if x.strip()]
    bad = [x for x in policies if x not in POLICY_NAMES]
    if bad or not policies:
        return fail(f"unknown policy {', '.join(bad) or '(none)'}; choose from {', '.join(POLICY_NAMES)}")
    if args.kv_policy not in KV_POLICY_NAMES:
        return fail(f"unknown kv policy {args.kv_policy!r}; choose from {', '.join(KV_POLICY_NAMES)}")
    if args.num_jobs < 1:
        return fail(f"--num-jobs must be >= 1, got {args.num_jobs}")
    if args.rate is not None and args.rate <= 0:
        return fail(f"--rate must be > 0, got {args.rate}")
    if args.rate is None and (args.workload in PRESETS or args.sweep_rates):
        return fail("--rate is required for synthetic workloads and as the start of --sweep-rates")
    try:
        cost = CostModel.from_profile(args.profile) if args.profile else CostModel.default()
    except ProfileError as exc:
        return fail(str(exc))
    # The output-length CV in effect (presets default to 1; mixes and traces have their own).
    args.cv = 1.0 if args.cv is None and args.workload in PRESETS else args.cv
    core_opts = dict(max_batch_size=args.max_batch_size, max_tokens_per_batch=args.max_tokens_per_batch,
                     num_queues=args.num_queues, quantum_ratio=args.quantum_ratio,
                     base_quantum=args.base_quantum, starvation_threshold=args.starvation_threshold)

    def jobs_at(rate: float | None):
        return make_workload(args.workload, num_jobs=args.num_jobs, rate=rate, cv=args.cv, seed=args.seed,
                             arrival_cv=args.arrival_cv)

    def run(policy: str, rate: float | None, occupancy_every: float | None = None):
        cfg = SimConfig(policy=policy, kv_policy=args.kv_policy, gpu_kv_blocks=args.gpu_kv_blocks,
                        host_kv_blocks=args.host_kv_blocks, copy_bandwidth=args.copy_bandwidth,
                        watermark=args.watermark, reserve=args.reserve, core=core_opts,
                        pipeline_parallel_size=args.pipeline_parallel_size, stage_transfer=args.stage_transfer,
                        occupancy_every=occupancy_every)
        return simulate(jobs_at(rate), cfg, cost)

    out: dict[str, dict] = {}
    curves: dict[str, list[tuple[float, float]]] = {}
    ttft_curves: dict[str, list[tuple[float, float]]] = {}
    jcts: dict[str, list[float]] = {}
    occupancy: list[tuple[float, list[int]]] = []
    try:
        # What no schedule of this trace can beat (scheduler/sim/bound.py).
        bound = lower_bound(jobs_at(args.rate), cost, max_batch_size=args.max_batch_size,
                            max_tokens_per_batch=args.max_tokens_per_batch).mean_norm_latency
        for pol in policies:
            res = run(pol, args.rate, OCCUPANCY_EVERY if args.out and not occupancy else None)
            occupancy = occupancy or res.occupancy
            m = dict(res.metrics, rate=args.rate, kv_policy=args.kv_policy, workload=args.workload, cv=args.cv,
                     norm_latency_lower_bound=bound)
            slo = args.slo or res.slo
            m["slo"] = slo
            jcts[pol] = [r.jct for r in res.records]
            if args.sweep_rates:
                sw = max_rate_at_slo(lambda r, _p=pol: run(_p, r).metrics, slo, args.rate)
                m.update(max_rate_at_slo=sw["max_rate_at_slo"], throughput_at_slo=sw["throughput_at_slo"],
                         sweep_points=sw["points"], sweep_saturated=sw["saturated"])
                curves[pol] = sw["points"]
                ttft_curves[pol] = sw["ttft_points"]
            elif args.plot and args.rate:
                curves[pol] = [(args.rate * f, run(pol, args.rate * f).metrics["mean_norm_latency"])
                               for f in (0.5, 0.75, 1.0, 1.25, 1.5)]
            out[pol] = m
    except (ValueError, TraceError, RuntimeError) as exc:
        return fail(str(exc))
    title = f"{args.workload} cv={args.cv} kv={args.kv_policy} rate={args.rate}"
    if args.plot:
        from fastserve.scheduler.sim.plot import PlotUnavailable, plot

        try:
            plot(args.plot, curves, jcts, out[policies[0]]["slo"], title)
        except PlotUnavailable as exc:
            return fail(f"--plot: {exc}")
    if args.out:
        _write_report(args.out, out, ttft_curves, curves, occupancy, policies[0], title)
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        _print_table(out, args)
    return 0


OCCUPANCY_EVERY = 0.1  # simulated seconds between samples of the queues


def _write_report(path: str, out: dict, ttft: dict, norm: dict, occupancy: list, first_policy: str,
                  title: str) -> None:
    """The JSON at `path`, the plots beside it (when matplotlib is there)."""
    from pathlib import Path

    from fastserve.scheduler.sim.plot import PlotUnavailable, plot_occupancy, plot_rates

    target = Path(path)
    target.write_text(json.dumps(out, indent=2) + "\n")
    stem = target.with_suffix("")
    try:
        if norm:
            plot_rates(f"{stem}.png", norm, ttft, out[first_policy]["slo"], title)
        if occupancy:
            plot_occupancy(f"{stem}.occupancy.png", [t for t, _ in occupancy], [q for _, q in occupancy],
                           f"{title}: jobs per queue, {first_policy}")
    except PlotUnavailable as exc:
        print(f"fastserve sim: {exc}; {path} is written, the plots are not", file=sys.stderr)


def _print_table(out: dict[str, dict], args: argparse.Namespace) -> None:
    first = next(iter(out.values()))
    cv = "per family" if args.cv is None else args.cv
    print(f"workload {args.workload}  rate {args.rate} req/s  jobs {args.num_jobs}  cv {cv}  "
          f"kv {args.kv_policy}  SLO {first['slo']:.3f} s/token  "
          f"lower bound on mean_norm_latency {first['norm_latency_lower_bound']:.4g}")
    cols = ["mean_norm_latency", "p95_norm_latency", "mean_jct", "p50_jct", "p99_jct", "mean_ttft", "p99_ttft",
            "throughput", "preemptions", "demotions", "promotions", "swaps"]
    if args.sweep_rates:
        cols += ["max_rate_at_slo", "throughput_at_slo"]
    print(f"{'':>18}" + "".join(f"{p:>12}" for p in out))
    for c in cols:
        row = "".join(f"{out[p][c]:>12.4g}" if isinstance(out[p][c], float) else f"{out[p][c]:>12}" for p in out)
        print(f"{c:>18}{row}")
    for p, m in out.items():
        print(f"{p:>10} queue joins: {m['queue_join_histogram']}")
