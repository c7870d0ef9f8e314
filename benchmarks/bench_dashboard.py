"""What watching costs: scheduler iteration time and served throughput with
the dashboard open in a real browser against closed, in the same run.

    python benchmarks/bench_dashboard.py --repeats 3 --out benchmarks/results/dashboard_cost.json

The whole stack runs in this process (`fastserve up` on the in-memory bus,
default: the tiny test model, where an iteration is shortest and any
overhead shows most) with one headless Chromium (Debian's chromium and
chromium-driver). The same workload is replayed in interleaved arms, their order rotated from one
repeat to the next:
  off     no snapshots at all (the scheduler's snapshot_interval = 0): the
          baseline of the broadcast itself
  closed  nobody watching (schedulers broadcast snapshots, the gateway keeps them)
  stream  another process reads /dashboard/stream: everything the serving
          side does for an open dashboard, without a browser's rendering
  open    the browser on /dashboard, live (checked: its status says "live").
          On this 2-core machine the browser renders on the cores the engine
          computes on; a dashboard is normally watched from another machine
Per run: output tokens per second of wall time, and from the scheduler's own
timings the mean iteration (result to result, back to back), its step and
its scheduling work, and the snapshot build time. `noise` is the spread of
the closed runs among themselves (max/min), the yardstick for the ratios.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from loadgen import load_jobs, run_load  # noqa: E402


def open_browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1500,1100"):
        options.add_argument(arg)
    return webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)


def loop_delta(before: dict, after: dict) -> dict:
    d = {k: after[k] - before[k] for k in before if isinstance(before[k], (int, float))}
    iters = max(d["iterations"], 1)
    return {"iterations": d["iterations"],
            "iteration_ms": 1e3 * d["wall_seconds"] / d["back_to_back"] if d["back_to_back"] else None,
            "step_ms": 1e3 * d["step_seconds"] / iters, "schedule_ms": 1e3 * d["schedule_seconds"] / iters,
            "snapshot_ms": 1e3 * d["snapshot_seconds"] / d["snapshots"] if d["snapshots"] else None,
            "snapshots": d["snapshots"]}


async def bench(args) -> dict:
    from fastserve.common.bus_memory import MemoryBus
    from fastserve.common.logging import setup_logging
    from fastserve.gpu_worker.model_maker import make_model
    from fastserve.launcher import NodeConfig, Stack

    setup_logging("bench", "WARNING")
    model = args.model or str(make_model(Path(tempfile.mkdtemp()) / "tiny", preset="tiny", seed=0))
    cfg = NodeConfig(model=model, served_model_name="bench", port=args.port, max_batch_size=args.max_batch_size,
                     gpu_kv_blocks=args.gpu_kv_blocks, host_kv_blocks=args.host_kv_blocks, log_level="WARNING")
    bus = MemoryBus()
    await bus.connect()
    stack = await Stack(cfg, bus).start()
    browser = await asyncio.to_thread(open_browser)
    jobs = load_jobs(args)
    sched = stack.scheduler
    interval = sched.config.snapshot_interval
    arms = ("off", "closed", "stream", "open")
    runs: dict[str, list[dict]] = {arm: [] for arm in arms}
    reader = [sys.executable, "-c", "import sys, urllib.request\nfor _ in urllib.request.urlopen(sys.argv[1]): pass",
              stack.base_url + "/dashboard/stream"]
    try:
        await run_load(stack.base_url, jobs[: len(jobs) // 4], progress=False)  # warm-up
        for rep in range(args.repeats):
            for arm in arms[rep % len(arms):] + arms[:rep % len(arms)]:  # each arm in each place in turn
                await asyncio.to_thread(browser.get, stack.base_url + "/dashboard" if arm == "open" else "about:blank")
                sched.config.snapshot_interval = 0 if arm == "off" else interval
                stream = subprocess.Popen(reader, stderr=subprocess.DEVNULL) if arm == "stream" else None
                await asyncio.sleep(1.0)
                before = asdict(sched.times)
                results, wall = await run_load(stack.base_url, jobs, progress=False)
                after = asdict(sched.times)
                if stream is not None:
                    stream.terminate()
                    stream.wait()
                status = await asyncio.to_thread(
                    browser.execute_script, "return document.getElementById('status')?.textContent ?? ''")
                if arm == "open" and status != "live":
                    raise RuntimeError(f"the dashboard was not live during the run: {status!r}")
                errors = sum(r.error is not None for r in results)
                tokens = sum(r.generated for r in results)
                runs[arm].append({"tokens_per_s": tokens / wall, "wall_s": wall, "errors": errors,
                                  **loop_delta(before, after)})
                print(f"{arm:>6}: {tokens / wall:8.1f} tok/s  {runs[arm][-1]['iteration_ms']:.3f} ms/iteration",
                      file=sys.stderr)
    finally:
        await asyncio.to_thread(browser.quit)
        await stack.stop()
        await bus.close()

    def mean(arm: str, key: str) -> float:
        return statistics.fmean(r[key] for r in runs[arm] if r[key] is not None)

    summary = {arm: {k: mean(arm, k) for k in ("tokens_per_s", "iteration_ms", "step_ms", "schedule_ms")}
               for arm in runs}
    for arm in arms[1:]:
        summary[arm]["snapshot_ms"] = mean(arm, "snapshot_ms")
    closed_tps = [r["tokens_per_s"] for r in runs["closed"]]
    closed_it = [r["iteration_ms"] for r in runs["closed"]]
    return {
        "setup": {"model": "tiny (test preset)" if not args.model else args.model, "workload": args.workload,
                  "num_jobs": len(jobs), "rate": args.rate, "scale": args.scale, "max_batch_size": args.max_batch_size,
                  "gpu_kv_blocks": args.gpu_kv_blocks, "repeats": args.repeats, "snapshot_interval_s": interval,
                  "bus": "memory://", "machine": "2 shared CPU cores, no GPU"},
        "runs": runs, "mean": summary,
        **{f"ratio_{a}_vs_{b}": {k: summary[a][k] / summary[b][k] for k in ("tokens_per_s", "iteration_ms")}
           for a, b in (("open", "closed"), ("stream", "closed"), ("closed", "off"))},
        "noise_closed_max_over_min": {"tokens_per_s": max(closed_tps) / min(closed_tps),
                                      "iteration_ms": max(closed_it) / min(closed_it)},
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", help="checkpoint directory (default: a tiny random model made in a temp dir)")
    p.add_argument("--workload", default="alpaca")
    p.add_argument("--num-jobs", type=int, default=120)
    p.add_argument("--rate", type=float, default=40.0, help="high enough to keep the worker busy")
    p.add_argument("--cv", type=float, default=1.0)
    p.add_argument("--arrival-cv", type=float, default=1.0)
    p.add_argument("--scale", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-batch-size", type=int, default=8)
    p.add_argument("--gpu-kv-blocks", type=int, default=64)
    p.add_argument("--host-kv-blocks", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--port", type=int, default=8791)
    p.add_argument("--out")
    args = p.parse_args()
    report = asyncio.run(bench(args))
    text = json.dumps(report, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
