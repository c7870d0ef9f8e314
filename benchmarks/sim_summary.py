"""Print the markdown tables of benchmarks/results/scheduler.md from the JSON
that benchmarks/sim_experiments.sh wrote:
    python benchmarks/sim_summary.py [OUT_DIR] [--prefix gpu_]
(--prefix: the PREFIX the script was run with, e.g. for a --profile run)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

_args = sys.argv[1:]
PREFIX = ""
if "--prefix" in _args:
    i = _args.index("--prefix")
    PREFIX = _args[i + 1]
    del _args[i:i + 2]
OUT = Path(_args[0] if _args else Path(__file__).parent / "results" / "sim")


def load(name: str) -> dict:
    return json.loads((OUT / f"{PREFIX}{name}.json").read_text())


def policy_table(name: str) -> None:
    sw, at = load(f"{name}_sweep"), load(f"{name}_at_fcfs_slo")
    f_at, f_sw = at["fcfs"], sw["fcfs"]
    print(f"\n**{name}** (SLO {f_at['slo']:.3f} s/token; all policies at fcfs's SLO rate "
          f"{f_at['rate']} req/s)\n")
    print("| policy | mean norm lat (s/tok) | vs fcfs | P95 norm lat | mean JCT | P50 JCT | P99 JCT | mean TTFT | "
          "P99 TTFT | throughput (req/s) | preempt | demote | promote | max rate at SLO | vs fcfs | "
          "throughput at that rate | queue joins |")
    print("|" + "---|" * 17)
    for p, m in at.items():
        s = sw[p]
        print(f"| {p} | {m['mean_norm_latency']:.4f} | {f_at['mean_norm_latency'] / m['mean_norm_latency']:.2f}x | "
              f"{m['p95_norm_latency']:.4f} | {m['mean_jct']:.2f} | {m['p50_jct']:.2f} | {m['p99_jct']:.1f} | "
              f"{m['mean_ttft']:.3f} | {m['p99_ttft']:.2f} | {m['throughput']:.3f} | {m['preemptions']} | "
              f"{m['demotions']} | {m['promotions']} | {s['max_rate_at_slo']:.3f}"
              f"{' (search capped)' if s['sweep_saturated'] else ''} | "
              f"{s['max_rate_at_slo'] / f_sw['max_rate_at_slo']:.2f}x | {s['throughput_at_slo']:.3f} | "
              f"{m['queue_join_histogram']} |")


def kv_table() -> None:
    print("\n" + (OUT / f"{PREFIX}kv_setup.txt").read_text().strip() + "\n")
    un = load("kv_unconstrained")["sj-mlfq"]
    print(f"Unconstrained (kv none, unlimited blocks): sj-mlfq mean norm latency {un['mean_norm_latency']:.4f}, "
          f"peak {un['peak_gpu_blocks']} blocks.\n")
    hosts = sorted({p.stem.rsplit("_host", 1)[1] for p in OUT.glob(f"{PREFIX}kv_*_host*.json")}, key=int)
    print("| host blocks | kv policy | sj-mlfq mean norm lat | P95 | mean JCT | mean TTFT | throughput | swaps | "
          "drops | fcfs mean norm lat |")
    print("|" + "---|" * 10)
    for h in hosts:
        for kv in ("proactive", "reactive", "recompute", "none"):
            d = load(f"kv_{kv}_host{h}")
            m = d["sj-mlfq"]
            print(f"| {h} | {kv} | {m['mean_norm_latency']:.4f} | {m['p95_norm_latency']:.4f} | {m['mean_jct']:.2f} | "
                  f"{m['mean_ttft']:.3f} | {m['throughput']:.3f} | {m['swaps']} | {m['drops']} | "
                  f"{d['fcfs']['mean_norm_latency']:.4f} |")


def bandwidth_table() -> None:
    bws = sorted({p.stem[len(PREFIX) + 5:].rsplit("_", 1)[0] for p in OUT.glob(f"{PREFIX}kv_bw*_*.json")}, key=float)
    if not bws:
        return
    print("\nCopy-link sensitivity (sj-mlfq, large host pool):\n")
    print("| copy bandwidth (B/s) | kv policy | mean norm lat | P95 | mean JCT | mean TTFT | throughput | swaps |")
    print("|" + "---|" * 8)
    for bw in bws:
        for kv in ("proactive", "reactive"):
            m = load(f"kv_bw{bw}_{kv}")["sj-mlfq"]
            print(f"| {bw} | {kv} | {m['mean_norm_latency']:.4f} | {m['p95_norm_latency']:.4f} | {m['mean_jct']:.2f} | "
                  f"{m['mean_ttft']:.3f} | {m['throughput']:.3f} | {m['swaps']} |")


def bench_table() -> None:
    b = load("bench_scheduler")
    print(f"\npolicy {b['policy']}, batch {b['batch']}, KV policy {b['kv_policy']}\n")
    print("| regime | waiting jobs | p50 (us) | p99 (us) | CPU p99 (us) | mean (us) | promotions | mean jobs swapped |")
    print("|---|---|---|---|---|---|---|---|")
    regimes = [r for r in ("default", "pressure") if r in b]
    for regime in regimes:
        for n, r in b[regime]["waiting"].items():
            print(f"| {regime} | {n} | {r['p50_us']:.0f} | {r['p99_us']:.0f} | {r['cpu_p99_us']:.0f} | {r['mean_us']:.0f} | "
                  f"{r['promotions']} | {r['mean_jobs_swapped']:.0f} |")
    print()
    for regime in regimes:
        print(f"p99 largest / smallest ({regime}): {b[regime]['p99_ratio_largest_vs_smallest']:.2f}x")

if __name__ == "__main__":
    for name in ("sharegpt_cv2", "sharegpt_cv1", "alpaca_cv2", "longprompt"):
        if (OUT / f"{PREFIX}{name}_at_fcfs_slo.json").exists():
            policy_table(name)
    if (OUT / f"{PREFIX}kv_setup.txt").exists():
        kv_table()
        bandwidth_table()
    if (OUT / f"{PREFIX}bench_scheduler.json").exists():
        bench_table()
