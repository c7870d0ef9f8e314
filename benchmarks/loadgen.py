"""Load generator: replay a workload against the REST API and report the
paper's measures as JSON.

    python benchmarks/loadgen.py --url http://127.0.0.1:8000 --workload alpaca --num-jobs 200 --rate 8
    python benchmarks/loadgen.py --spawn --policy fcfs --workload sharegpt --scale 0.25 --rate 2 --sim

Workloads come from the scheduler's generators (fastserve.scheduler.workload):
`sharegpt` / `alpaca` (lognormal lengths, Poisson or Gamma arrivals) or a JSONL
trace ({"arrival_time", "input_len", "output_len"} per line). Each job is sent
at its arrival time as a streaming /v1/completions request whose prompt is
`input_len` token ids and whose output is exactly `output_len` tokens
(max_tokens + ignore_eos), so the real stack and the simulator see one workload.

Measures per job: TTFT, TPOT (time per output token after the first), JCT and
normalized latency (JCT / output tokens); mean, P50, P95, P99 of each, and
throughput. `--spawn` starts the whole stack in this process (`fastserve up`
on the in-memory bus) with the given --policy; `--sim` also runs the
discrete-event simulator on the same trace with the cost model of --profile
(default: the scheduler's built-in CPU profile) and prints its prediction
beside the measurement.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np


@dataclass
class Result:
    index: int
    arrival: float  # scheduled send time, seconds from the start
    input_len: int
    output_len: int  # tokens asked for
    generated: int = 0
    ttft: float | None = None
    jct: float | None = None
    error: str | None = None

    @property
    def tpot(self) -> float | None:
        if self.jct is None or self.ttft is None or self.generated < 2:
            return None
        return (self.jct - self.ttft) / (self.generated - 1)


def load_jobs(args) -> list:
    from fastserve.scheduler.workload import make_workload

    jobs = make_workload(args.workload, num_jobs=args.num_jobs, rate=args.rate, cv=args.cv, seed=args.seed,
                         arrival_cv=args.arrival_cv)
    if args.scale != 1.0:
        from fastserve.scheduler.workload import TraceJob

        jobs = [TraceJob(j.arrival_time, max(1, round(j.input_len * args.scale)),
                         max(1, round(j.output_len * args.scale))) for j in jobs]
    return jobs


async def send_one(http, url: str, model: str, headers: dict, job, index: int, t0: float, vocab: int,
                   rng: random.Random, max_len: int) -> Result:
    inp = min(job.input_len, max_len - 1)
    out = max(1, min(job.output_len, max_len - inp))
    res = Result(index, job.arrival_time, inp, out)
    delay = t0 + job.arrival_time - time.perf_counter()
    if delay > 0:
        await asyncio.sleep(delay)
    prompt = [rng.randrange(3, vocab) for _ in range(inp)]
    body = {"model": model, "prompt": prompt, "max_tokens": out, "ignore_eos": True, "temperature": 0.0,
            "stream": True, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    try:
        async with http.post(f"{url}/v1/completions", json=body, headers=headers) as r:
            if r.status != 200:
                res.error = f"HTTP {r.status}: {(await r.text())[:300]}"
                return res
            async for line in r.content:
                if not line.startswith(b"data: {"):
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("choices") and res.ttft is None:
                    res.ttft = time.perf_counter() - start
                if chunk.get("usage"):
                    res.generated = chunk["usage"]["completion_tokens"]
        res.jct = time.perf_counter() - start
    except Exception as exc:  # reported per job, counted in the summary
        res.error = f"{type(exc).__name__}: {exc}"
    return res


def _dist(values: list[float]) -> dict:
    if not values:
        return {}
    a = np.array(values)
    return {"mean": float(a.mean()), "p50": float(np.percentile(a, 50)), "p95": float(np.percentile(a, 95)),
            "p99": float(np.percentile(a, 99))}


def summarize(results: list[Result], wall: float) -> dict:
    ok = [r for r in results if r.error is None and r.jct is not None]
    span = max((r.arrival + r.jct for r in ok), default=0.0) - min((r.arrival for r in ok), default=0.0)
    return {
        "num_jobs": len(results), "completed": len(ok), "errors": len(results) - len(ok),
        "first_errors": [r.error for r in results if r.error][:3],
        "ttft_s": _dist([r.ttft for r in ok if r.ttft is not None]),
        "tpot_s": _dist([r.tpot for r in ok if r.tpot is not None]),
        "jct_s": _dist([r.jct for r in ok]),
        "norm_latency_s_per_token": _dist([r.jct / max(r.generated, 1) for r in ok]),
        "throughput_req_s": len(ok) / span if span > 0 else None,
        "throughput_tok_s": sum(r.generated for r in ok) / span if span > 0 else None,
        "wall_s": wall,
    }


async def run_load(url: str, jobs: list, *, api_key: str | None = None, seed: int = 0, progress: bool = True,
                   concurrency_limit: int = 10000) -> tuple[list[Result], float]:
    import aiohttp
    from tqdm import tqdm

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    connector = aiohttp.TCPConnector(limit=concurrency_limit)
    timeout = aiohttp.ClientTimeout(total=None, sock_read=600)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as http:
        async with http.get(f"{url}/v1/models", headers=headers) as r:
            r.raise_for_status()
            card = (await r.json())["data"][0]
        model, max_len = card["id"], int(card.get("max_model_len") or 2048)
        vocab = 1000  # random prompt ids below every preset's vocabulary (tiny: 1024)
        bar = tqdm(total=len(jobs), desc="jobs", unit="job", disable=not progress, file=sys.stderr)
        rng = random.Random(seed)
        t0 = time.perf_counter()

        async def one(i, job):
            r = await send_one(http, url, model, headers, job, i, t0, vocab, random.Random(rng.random()), max_len)
            bar.update(1)
            return r

        results = await asyncio.gather(*(one(i, j) for i, j in enumerate(jobs)))
        bar.close()
        return list(results), time.perf_counter() - t0


def profile_from_steps(step_log, offline: dict, overhead: float) -> dict | None:
    """A cost-model profile as the serving loop sees iterations: decode points
    from the worker's own pure-decode steps in this run, prefill points from
    the offline profile (pure-prefill steps are rare and small under load, and
    extrapolating them is noisy), each plus the loop's measured per-iteration
    control overhead (the simulator's iteration is the whole loop turn)."""
    dec = [{"batch_size": n_dec, "context_len": ctx_sum / n_dec, "seconds": seconds + overhead}
           for prefill_tokens, n_dec, ctx_sum, seconds in step_log if n_dec and not prefill_tokens]
    if not dec:
        return None
    prefill = [{"tokens": p["tokens"], "seconds": p["seconds"] + overhead} for p in offline["prefill"]]
    return {**offline, "model": "in-situ", "device": "serving run", "prefill": prefill, "decode": dec}


def offline_profile(args) -> dict:
    from fastserve.scheduler.cost_model import _default_profile

    if args.profile:
        return json.loads(Path(args.profile).read_text())
    return _default_profile(args.block_size)


def simulate(jobs: list, policy: str, args, profile: dict | None = None) -> dict:
    from fastserve.scheduler.cost_model import CostModel
    from fastserve.scheduler.sim import SimConfig, simulate as sim

    if profile is not None:
        cost = CostModel.from_dict(profile, source="in-situ")
    else:
        cost = CostModel.from_profile(args.profile) if args.profile else CostModel.default(args.block_size)
    cfg = SimConfig(policy=policy, kv_policy=args.kv_policy, gpu_kv_blocks=args.gpu_kv_blocks,
                    host_kv_blocks=args.host_kv_blocks,
                    core={"max_batch_size": args.max_batch_size, "max_tokens_per_batch": args.max_tokens_per_batch})
    return sim(jobs, cfg, cost).metrics


async def spawn_and_run(args, jobs) -> tuple[list[Result], float, dict]:
    from fastserve.common.bus_memory import MemoryBus
    from fastserve.common.logging import setup_logging
    from fastserve.common.up import NodeConfig, Stack, ensure_default_model

    setup_logging("loadgen", args.log_level)  # JSON lines on stderr; stdout stays the report

    model = args.model or str(ensure_default_model("~/.cache/fastserve/models"))
    cfg = NodeConfig(model=model, port=args.port, policy=args.policy, kv_policy=args.kv_policy,
                     max_batch_size=args.max_batch_size, max_tokens_per_batch=args.max_tokens_per_batch,
                     block_size=args.block_size, gpu_kv_blocks=args.gpu_kv_blocks,
                     host_kv_blocks=args.host_kv_blocks, profile=args.profile, replica=f"loadgen{args.port}",
                     device=args.device, dtype=args.dtype, pipeline_depth=args.pipeline_depth)
    from fastserve.common.bus import make_bus

    bus = make_bus(args.broker, namespace=f"loadgen-{args.port}-{int(time.time())}") if args.broker else MemoryBus()
    await bus.connect()
    stack = await Stack(cfg, bus).start()
    try:
        await _wait_health(stack.base_url)
        results, wall = await run_load(stack.base_url, jobs, seed=args.seed, progress=not args.quiet)
        loop = stack.scheduler.times.summary()
        loop["preemptions"] = stack.scheduler.core.stats.preemptions
        loop["offloads"] = stack.scheduler.core.stats.offloads
        overhead = loop["mean_control_overhead_ms"] / 1e3
        loop["in_situ_profile"] = profile_from_steps(list(stack.worker.step_log), offline_profile(args), overhead)
        return results, wall, loop
    finally:
        await stack.stop()
        if hasattr(bus, "delete_declared"):
            await bus.delete_declared()
        await bus.close()


async def _wait_health(url: str) -> None:
    import aiohttp

    async with aiohttp.ClientSession() as http:
        for _ in range(300):
            try:
                async with http.get(f"{url}/health") as r:
                    if r.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.1)
    raise TimeoutError(f"{url}/health never became 200")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--url", help="gateway base URL (without /v1); or --spawn")
    p.add_argument("--spawn", action="store_true", help="start the stack in this process (fastserve up)")
    p.add_argument("--api-key")
    p.add_argument("--workload", default="alpaca", help="sharegpt | alpaca | trace.jsonl")
    p.add_argument("--num-jobs", type=int, default=100)
    p.add_argument("--rate", type=float, default=4.0, help="mean arrivals per second")
    p.add_argument("--cv", type=float, default=1.0, help="output-length coefficient of variation")
    p.add_argument("--arrival-cv", type=float, default=1.0, help="1: Poisson; >1 burstier (Gamma)")
    p.add_argument("--scale", type=float, default=1.0, help="multiply every length (CPU-sized runs)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sim", action="store_true", help="also simulate the same trace and policy")
    p.add_argument("--out", help="write the JSON report here too")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    # --spawn / --sim settings (the same names as `fastserve up`)
    p.add_argument("--model")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--broker", help="with --spawn: amqp://... to put the services on RabbitMQ (default: in-memory bus)")
    p.add_argument("--port", type=int, default=8765)
    p.add_argument("--policy", default="sj-mlfq", choices=["sj-mlfq", "mlfq", "fcfs"])
    p.add_argument("--kv-policy", default="proactive")
    p.add_argument("--pipeline-depth", type=int, default=1)
    p.add_argument("--max-batch-size", type=int, default=32)
    p.add_argument("--max-tokens-per-batch", type=int, default=2048)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--gpu-kv-blocks", type=int, default=None)
    p.add_argument("--host-kv-blocks", type=int, default=1024)
    p.add_argument("--log-level", default="WARNING", help="of the spawned services")
    p.add_argument("--profile", help="profile JSON (fastserve profile) for the scheduler and the simulator")
    args = p.parse_args(argv)
    if not args.url and not args.spawn:
        p.error("give --url of a running gateway, or --spawn")
    jobs = load_jobs(args)
    report: dict = {"workload": args.workload, "num_jobs": len(jobs), "rate": args.rate, "scale": args.scale,
                    "policy": args.policy if args.spawn else None,
                    "bus": (args.broker or "memory://").split("@")[-1] if args.spawn else None}
    if args.spawn:
        results, wall, loop = asyncio.run(spawn_and_run(args, jobs))
        report["scheduler_loop"] = loop
    else:
        results, wall = asyncio.run(run_load(args.url, jobs, api_key=args.api_key, seed=args.seed,
                                             progress=not args.quiet))
    report["real"] = summarize(results, wall)
    in_situ = report.get("scheduler_loop", {}).pop("in_situ_profile", None)
    if in_situ is not None:
        report["in_situ_profile"] = {"decode_points": len(in_situ["decode"])}
    if args.sim:
        keys = ("mean_jct", "p99_jct", "mean_ttft", "mean_norm_latency", "p95_norm_latency", "preemptions",
                "throughput")
        real_jct = report["real"]["jct_s"].get("mean")
        # The offline profile (or the built-in one), and, with --spawn, the
        # iteration costs measured in this run: the same scheduler, other costs.
        for name, prof in (("sim", None), ("sim_in_situ", in_situ)):
            if name == "sim_in_situ" and prof is None:
                continue
            sim = simulate(jobs, args.policy, args, prof)
            report[name] = {k: sim[k] for k in keys}
            if real_jct:
                report[name]["mean_jct_error_vs_real"] = (sim["mean_jct"] - real_jct) / real_jct
    text = json.dumps(report, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0 if report["real"]["errors"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
