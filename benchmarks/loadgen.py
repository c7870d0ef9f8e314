"""Load generator: replay a workload against the REST API and report the
paper's measures as JSON.

    python benchmarks/loadgen.py --url http://127.0.0.1:8000 --workload alpaca --num-jobs 200 --rate 8
    python benchmarks/loadgen.py --spawn --policy fcfs --workload sharegpt --scale 0.25 --rate 2 --sim
    python benchmarks/loadgen.py --spawn --broker amqp://guest:guest@127.0.0.1:5672/ \
        --policy default,fcfs --workload chat,rag --rate 4.5,2.5 --scale 0.25 --num-jobs 90

Workloads come from the scheduler's generators (fastserve.scheduler.sim.workload):
`sharegpt` / `alpaca` (lognormal lengths), the request-family mixes `chat`,
`summarization`, `rag`, `code` (scheduler/sim/mixes.py; Poisson or Gamma
arrivals), or a JSONL trace ({"arrival_time", "input_len", "output_len"} per line). Each job is sent
at its arrival time as a streaming /v1/completions request whose prompt is
`input_len` token ids and whose output is exactly `output_len` tokens
(max_tokens + ignore_eos), so the real stack and the simulator see one workload.

Measures per job: TTFT, TPOT (time per output token after the first), JCT and
normalized latency (JCT / output tokens); mean, P50, P95, P99 of each, and
throughput. `--spawn` starts the whole stack in this process (`fastserve up`
on the in-memory bus, or RabbitMQ with --broker) with the given --policy; with
several workloads and/or policies it runs each pair in turn, a fresh stack
each, and reports them side by side (`comparison`: per workload, each policy's
normalized latency and its ratio to the first policy's); `--sim` also runs the
discrete-event simulator on the same trace with the cost model of --profile
(default: the scheduler's built-in CPU profile) and prints its prediction
beside the measurement; with --spawn also `sim_in_situ`: the step costs this
run measured (profile_from_steps), the loop's control overhead apart, and the
scheduler deciding by its own profile as the service does. `--trace-out`
keeps per-job and per-iteration traces of the real core and the simulator
for benchmarks/sim_calibration.py.

During each run the gateway's /dashboard/snapshot is read 4 times a second:
the report's `queues` is how many jobs sat in each MLFQ level over time.
Several rates (`--rate 2,4,8`) and, with --spawn, several policies
(`--policy sj-mlfq,fcfs`) make one run each and a report {"runs": [...]}.
`--out X.json` also draws beside it (matplotlib, `pip install
'fastserve[plot]'`): X.occupancy.png (jobs per level over the first run)
and, with several rates, X.png (normalized latency and TTFT against the rate
per policy, with the SLO line).
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

from fastserve.common import settings as S


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
    from fastserve.scheduler.sim.workload import make_workload

    jobs = make_workload(args.workload, num_jobs=args.num_jobs, rate=args.rate, cv=args.cv, seed=args.seed,
                         arrival_cv=args.arrival_cv)
    if args.scale != 1.0:
        from fastserve.scheduler.sim.workload import TraceJob

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


QUEUE_SAMPLE_EVERY = 0.25  # seconds between reads of /dashboard/snapshot


async def sample_queues(http, url: str, headers: dict, t0: float, out: dict, stop: asyncio.Event) -> None:
    """Jobs per MLFQ level (all replicas together) and the SLO, from the dashboard, until `stop`."""
    import aiohttp

    while not stop.is_set():
        try:
            async with http.get(f"{url}/dashboard/snapshot", headers=headers) as r:
                view = await r.json() if r.status == 200 else None
        except aiohttp.ClientError:
            view = None
        if view and view["replicas"]:
            per_level = [0] * max(len(r["levels"]) for r in view["replicas"])
            for rep in view["replicas"]:
                for lv in rep["levels"]:
                    per_level[lv["level"]] += lv["num_jobs"]
            out["t"].append(round(time.perf_counter() - t0, 3))
            out["jobs_per_level"].append(per_level)
            out["slo"] = view["replicas"][0]["slo"]
        try:
            await asyncio.wait_for(stop.wait(), QUEUE_SAMPLE_EVERY)
        except asyncio.TimeoutError:
            pass


async def run_load(url: str, jobs: list, *, api_key: str | None = None, seed: int = 0, progress: bool = True,
                   concurrency_limit: int = 10000, on_start=None,
                   queues: dict | None = None) -> tuple[list[Result], float]:
    """`queues`: filled with the jobs per level over the run ({"t": [], "jobs_per_level": []} to start)."""
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
        if on_start is not None:
            on_start(t0)  # the time arrivals count from

        async def one(i, job):
            r = await send_one(http, url, model, headers, job, i, t0, vocab, random.Random(rng.random()), max_len)
            bar.update(1)
            return r

        stop = asyncio.Event()
        sampler = asyncio.create_task(sample_queues(http, url, headers, t0, queues, stop)) if queues is not None \
            else None
        results = await asyncio.gather(*(one(i, j) for i, j in enumerate(jobs)))
        wall = time.perf_counter() - t0
        stop.set()
        if sampler is not None:
            await sampler
        bar.close()
        return list(results), wall


def profile_from_steps(step_log, offline: dict, prefill: str = "in-situ", min_prefill_steps: int = 5) -> dict | None:
    """A cost-model profile of the engine's steps as this serving run saw them
    (the worker's own step times; the loop's control overhead is not in it:
    the simulator adds that apart, uncharged). Decode: fitted to the
    pure-decode steps. Prefill: fitted to the steps that held a prefill
    (mostly mixed with decodes under load) as a fixed cost plus a cost per
    prompt token over what the decode fit says the rest of the step cost;
    `prefill="offline"`, or fewer than `min_prefill_steps` such steps, keeps
    the offline profile's prefill points instead.

    Why in situ: the serving stack's steps are slower than the profiler's
    isolated ones (the event loop's thread shares the CPU and the GIL with the
    engine's), and prefill more so: offline prefill points beside in-situ
    decode ones under-charged every mixed step (1.8x on the CPU; see
    benchmarks/results/services.md)."""
    step_log = [tuple(s) for s in step_log]
    if not any(n and not p for p, n, _, _ in step_log):
        return None
    return _fit_steps(step_log, offline, prefill, min_prefill_steps)


def _fit_steps(step_log, offline: dict, prefill: str, min_prefill_steps: int) -> dict:
    from fastserve.scheduler.core.cost_model import CostModel

    dec = [{"batch_size": n_dec, "context_len": ctx_sum / n_dec, "seconds": seconds}
           for prefill_tokens, n_dec, ctx_sum, seconds in step_log if n_dec and not prefill_tokens]
    out = {**offline, "model": "in-situ", "device": "serving run", "decode": dec, "prefill_source": "offline"}
    pre = [s for s in step_log if s[0]]
    if prefill != "in-situ" or len(pre) < min_prefill_steps:
        return out
    model = CostModel.from_dict(out, source="in-situ")
    a = model.overhead
    tokens = np.array([float(s[0]) for s in pre])
    rest = np.array([model.decode_time(n, c / n) if n else a for _, n, c, _ in pre])
    y = np.array([s[3] for s in pre]) - rest  # what the prefill added to its step
    (fixed, per_token), *_ = np.linalg.lstsq(np.stack([np.ones_like(tokens), tokens], 1), y, rcond=None)
    if fixed < 0:  # time never shrinks with more work: through the origin instead
        fixed, per_token = 0.0, float(tokens @ y / (tokens @ tokens))
    if per_token <= 0:
        return out
    grid = sorted({1, *(int(q["tokens"]) for q in offline["prefill"]), int(tokens.max())})
    out["prefill"] = [{"tokens": t, "seconds": a + fixed + per_token * t} for t in grid]
    out["prefill_source"] = f"in-situ fit of {len(pre)} steps: {fixed * 1e3:.2f} ms + {per_token * 1e3:.3f} ms/token"
    return out


def fold_overhead(profile: dict, overhead: float) -> dict:
    """The profile as the first calibration had it (kept to compare): the
    loop's control overhead added to every point, so the scheduler is charged it too."""
    return {**profile, "prefill": [{**q, "seconds": q["seconds"] + overhead} for q in profile["prefill"]],
            "decode": [{**q, "seconds": q["seconds"] + overhead} for q in profile["decode"]]}


def offline_profile(args) -> dict:
    from fastserve.scheduler.core.cost_model import _default_profile

    if args.profile:
        return json.loads(Path(args.profile).read_text())
    return _default_profile(args.block_size)


def simulate(jobs: list, policy: str, args, profile: dict | None = None, control_overhead: float = 0.0,
             scheduler_model: str = "scheduler", slowdown: list | None = None):
    """The simulator on the same trace and settings. `profile`: what the
    iterations cost (None: the scheduler's own profile, --profile or the
    built-in one); `control_overhead`: seconds the loop adds per iteration,
    uncharged. `scheduler_model`: "scheduler" builds the core from the
    scheduler's own profile, as the service does (its quanta, skip-join levels
    and starvation threshold); "timing" from `profile` (the first calibration's way).
    `slowdown`: SimConfig.slowdown (replaying a run's drift; diagnostics)."""
    from fastserve.scheduler.core.cost_model import CostModel
    from fastserve.scheduler.sim.simulator import SimConfig, simulate as sim

    own = CostModel.from_profile(args.profile) if args.profile else CostModel.default(args.block_size)
    cost = CostModel.from_dict(profile, source="in-situ") if profile is not None else own
    cfg = SimConfig(policy=policy, kv_policy=args.kv_policy, gpu_kv_blocks=args.gpu_kv_blocks,
                    host_kv_blocks=args.host_kv_blocks, control_overhead=control_overhead, slowdown=slowdown,
                    core={"max_batch_size": args.max_batch_size, "max_tokens_per_batch": args.max_tokens_per_batch})
    return sim(jobs, cfg, cost, policy_cost=own if scheduler_model == "scheduler" else cost)


class CoreTracer:
    """Records what the real scheduler core was told, per iteration and per
    job, by wrapping the methods of the running core (the service is not
    touched): when each job was added and at which level, which jobs each
    batch held, and the time each update charged. Compared job by job with
    the simulator's trace (`--trace-out`)."""

    def __init__(self, core):
        self.core = core
        self.t0 = time.perf_counter()
        self.added: list[dict] = []  # in add order
        self.iterations: list[dict] = []
        self._sched: dict[int, dict] = {}
        add, schedule, update = core.add_job, core.schedule, core.update

        def add_job(spec, now):
            add(spec, now)
            self.added.append({"job_id": spec.job_id, "t": time.perf_counter() - self.t0, "input_len": spec.input_len,
                               "max_tokens": spec.max_tokens, "level": core.job_level(spec.job_id)})

        def schedule_(now):
            d = schedule(now)
            if d.batch:
                self._sched[d.iteration] = {
                    "iteration": d.iteration, "t_sched": time.perf_counter() - self.t0,
                    "batch": [[e.job_id, int(e.is_prefill), e.num_new_tokens, e.num_computed, int(e.sample)]
                              for e in d.batch]}
            return d

        def update_(result, now):
            update(result, now)
            rec = self._sched.pop(result.iteration, None)
            if rec is not None:
                rec.update(t_done=time.perf_counter() - self.t0, charged=result.elapsed,
                           predicted=core.cost_model.iteration_time(
                               [_Entry(b[1], b[2], b[3]) for b in rec["batch"]]))
                self.iterations.append(rec)

        core.add_job, core.schedule, core.update = add_job, schedule_, update_

    def set_t0(self, t0: float) -> None:
        """Times so far were from construction; from now on from the load's start."""
        shift = t0 - self.t0
        self.t0 = t0
        for a in self.added:
            a["t"] -= shift

    def per_job(self, results: list[Result]) -> list[dict]:
        """One row per trace job (by index): when the scheduler got it, its
        join level, the iterations it ran in (prefill ones apart)."""
        runs: dict[str, list[int]] = {}
        for it in self.iterations:
            for jid, is_prefill, *_ in it["batch"]:
                r = runs.setdefault(jid, [0, 0])
                r[0] += 1
                r[1] += is_prefill
        # Jobs are added in send order; match each to the first unmatched
        # trace job of the same lengths (near-simultaneous sends may swap).
        free = {}
        for r in results:
            free.setdefault((r.input_len, r.output_len), []).append(r.index)
        rows = {}
        for a in self.added:
            idx = free.get((a["input_len"], a["max_tokens"]), [])
            if idx:
                i = idx.pop(0)
                n = runs.get(a["job_id"], [0, 0])
                rows[i] = {"t_added": a["t"], "join_level": a["level"], "iterations": n[0],
                           "prefill_iterations": n[1]}
        return [rows.get(r.index, {}) for r in results]


@dataclass
class _Entry:
    is_prefill: bool
    num_new_tokens: int
    num_computed: int


async def spawn_and_run(args, jobs, queues: dict | None = None) -> tuple[list[Result], float, dict]:
    from fastserve.common.bus_memory import MemoryBus
    from fastserve.common.logging import setup_logging
    from fastserve.launcher import NodeConfig, Stack, ensure_default_model

    setup_logging("loadgen", args.log_level)  # JSON lines on stderr; stdout stays the report

    model = args.model or str(ensure_default_model("~/.cache/fastserve/models"))
    cfg = NodeConfig(model=model, port=args.port, policy=args.policy, kv_policy=args.kv_policy,
                     max_batch_size=args.max_batch_size, max_tokens_per_batch=args.max_tokens_per_batch,
                     block_size=args.block_size, gpu_kv_blocks=args.gpu_kv_blocks,
                     host_kv_blocks=args.host_kv_blocks, profile=args.profile, replica=f"loadgen{args.port}",
                     device=args.device, dtype=args.dtype, max_batches_in_flight=args.max_batches_in_flight)
    from fastserve.common.bus import make_bus

    bus = make_bus(args.broker, namespace=f"loadgen-{args.port}-{args.policy}-{int(time.time())}") \
        if args.broker else MemoryBus()
    await bus.connect()
    stack = await Stack(cfg, bus).start()
    try:
        await _wait_health(stack.base_url)
        tracer = CoreTracer(stack.scheduler.core) if args.trace_out else None
        results, wall = await run_load(stack.base_url, jobs, seed=args.seed, progress=not args.quiet,
                                       on_start=tracer.set_t0 if tracer else None, queues=queues)
        loop = stack.scheduler.times.summary()
        loop["preemptions"] = stack.scheduler.core.stats.preemptions
        loop["offloads"] = stack.scheduler.core.stats.offloads
        loop["step_log"] = list(stack.worker.step_log)
        if tracer is not None:
            loop["trace"] = {"jobs": tracer.per_job(results), "iterations": tracer.iterations,
                             "results": [asdict(r) for r in results]}
        return results, wall, loop
    finally:
        await stack.stop()
        if hasattr(bus, "delete_declared"):
            await bus.delete_declared()
        await bus.close()


def sim_trace(res) -> dict:
    """The simulator's per-job rows, by trace index (the simulator names job i `j<i>`)."""
    by_id = {r.job_id: r for r in res.records}
    rows = []
    for i in range(len(res.records)):
        r = by_id[f"j{i}"]
        n = res.job_iterations.get(r.job_id, [0, 0])
        rows.append({"arrival": r.arrival, "ttft": r.ttft, "jct": r.jct, "join_level": r.join_queue,
                     "iterations": n[0], "prefill_iterations": n[1]})
    return {"jobs": rows, "iterations": res.iterations}


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


# What `fastserve up --policy` takes, srpt and oracle included: loadgen sets
# max_tokens to each job's true output length, so they know it, as in the simulator.
POLICIES = S.POLICIES


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--url", help="gateway base URL (without /v1); or --spawn")
    p.add_argument("--spawn", action="store_true", help="start the stack in this process (fastserve up)")
    p.add_argument("--api-key")
    p.add_argument("--workload", default="alpaca",
                   help="sharegpt | alpaca (presets), chat | summarization | rag | code (mixes) | trace.jsonl; "
                        "a comma-separated list runs each in turn")
    p.add_argument("--num-jobs", type=int, default=100)
    p.add_argument("--rate", default="4",
                   help="mean arrivals per second; comma-separated: with one workload, one run per rate; "
                        "with several, one rate per workload")
    p.add_argument("--cv", type=float, default=None, help="output-length CV of a preset (default 1)")
    p.add_argument("--arrival-cv", type=float, default=1.0, help="1: Poisson; >1 burstier (Gamma)")
    p.add_argument("--scale", type=float, default=1.0, help="multiply every length (CPU-sized runs)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sim", action="store_true", help="also simulate the same trace and policy")
    p.add_argument("--out", help="write the JSON report here too, and its plots beside it (X.json -> X.*.png)")
    p.add_argument("--trace-out", help="with --spawn: write per-job and per-iteration traces of the real run "
                                       "(and with --sim, of each simulation) to this JSON file")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    # --spawn / --sim settings (the same names as `fastserve up`)
    p.add_argument("--model")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--broker", help="with --spawn: amqp://... to put the services on RabbitMQ (default: in-memory bus)")
    p.add_argument("--port", type=int, default=8765)
    p.add_argument("--policy", default="default",
                   help=f"{' | '.join(POLICIES)}; with --spawn a comma-separated list runs each in turn")
    p.add_argument("--kv-policy", default="proactive")
    p.add_argument("--max-batches-in-flight", type=int, default=2)
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
    workloads = [w.strip() for w in args.workload.split(",") if w.strip()]
    try:
        rates = [float(x) for x in args.rate.split(",") if x.strip()]
    except ValueError:
        p.error(f"--rate: expected numbers, got {args.rate!r}")
    if not workloads or not rates or min(rates) <= 0:
        p.error("--workload and --rate need at least one value (rates > 0)")
    if len(workloads) == 1:
        args.pairs = [(workloads[0], r) for r in rates]
    elif len(rates) in (1, len(workloads)):
        args.pairs = list(zip(workloads, rates * len(workloads) if len(rates) == 1 else rates))
    else:
        p.error("--rate: with several workloads, one rate or one per workload")
    args.policies = [x.strip() for x in args.policy.split(",") if x.strip()]
    bad = [x for x in args.policies if x not in POLICIES]
    if bad or not args.policies:
        p.error(f"--policy: choose from {', '.join(POLICIES)}, got {args.policy!r}")
    if len(args.policies) > 1 and not args.spawn:
        p.error("several policies need --spawn (a running gateway has one)")
    if len(args.pairs) * len(args.policies) > 1 and args.trace_out:
        p.error("--trace-out takes one run: one workload, one rate, one policy")
    return args


def run_one(args: argparse.Namespace) -> tuple[dict, dict]:
    """One workload at one rate under one policy: the report and the traces."""
    jobs = load_jobs(args)
    report: dict = {"workload": args.workload, "num_jobs": len(jobs), "rate": args.rate, "scale": args.scale,
                    "policy": args.policy if args.spawn else None,
                    "bus": (args.broker or "memory://").split("@")[-1] if args.spawn else None}
    queues: dict = {"every_s": QUEUE_SAMPLE_EVERY, "t": [], "jobs_per_level": [], "slo": None}
    if args.spawn:
        results, wall, loop = asyncio.run(spawn_and_run(args, jobs, queues))
        report["scheduler_loop"] = loop
    else:
        results, wall = asyncio.run(run_load(args.url, jobs, api_key=args.api_key, seed=args.seed,
                                             progress=not args.quiet, queues=queues))
    report["real"] = summarize(results, wall)
    report["queues"] = queues
    loop = report.get("scheduler_loop", {})
    step_log = loop.pop("step_log", None)
    traces = {"real": loop.pop("trace", None), "step_log": step_log}
    in_situ = profile_from_steps(step_log, offline_profile(args)) if step_log else None
    overhead = loop.get("mean_control_overhead_ms", 0.0) / 1e3
    if in_situ is not None:
        report["in_situ_profile"] = {"decode_points": len(in_situ["decode"]),
                                     "prefill": in_situ["prefill_source"], "control_overhead_s": overhead}
    if args.sim:
        keys = ("mean_jct", "p99_jct", "mean_ttft", "mean_norm_latency", "p95_norm_latency", "preemptions",
                "throughput")
        real_jct = report["real"]["jct_s"].get("mean")
        # The offline profile (or the built-in one), and, with --spawn, the
        # step costs measured in this run plus the loop's control overhead,
        # with the scheduler deciding by its own profile as the service does.
        for name, prof in (("sim", None), ("sim_in_situ", in_situ)):
            if name == "sim_in_situ" and prof is None:
                continue
            res = simulate(jobs, args.policy, args, prof, overhead if prof is not None else 0.0)
            sim = res.metrics
            report[name] = {k: sim[k] for k in keys}
            traces[name] = sim_trace(res)
            if real_jct:
                report[name]["mean_jct_error_vs_real"] = (sim["mean_jct"] - real_jct) / real_jct
    return report, traces


def compare(reports: list[dict]) -> dict:
    """Per workload and rate, each policy's normalized latency and its ratio to the first policy's."""
    out: dict = {}
    for r in reports:
        nl = r["real"]["norm_latency_s_per_token"]
        out.setdefault(f"{r['workload']}@{r['rate']:g}", {})[r["policy"] or "served"] = {
            "mean": nl.get("mean"), "p95": nl.get("p95"), "errors": r["real"]["errors"]}
    for per in out.values():
        first = next(iter(per.values()))["mean"]
        for v in per.values():
            v["mean_vs_first_policy"] = v["mean"] / first if first and v["mean"] else None
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    runs = []
    for workload, rate in args.pairs:
        for policy in args.policies:
            one = argparse.Namespace(**{**vars(args), "workload": workload, "rate": rate, "policy": policy})
            runs.append(run_one(one))
    reports = [r for r, _ in runs]
    if len(runs) == 1:
        report, traces = runs[0]
        text = json.dumps(report, indent=1)
        if args.trace_out:
            Path(args.trace_out).write_text(json.dumps({"args": vars(args), "report": report, "traces": traces}) + "\n")
    else:
        text = json.dumps({"comparison": compare(reports), "runs": reports}, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
        _plots(args.out, reports)
    return 0 if all(r["real"]["errors"] == 0 for r in reports) else 1


def _plots(out: str, runs: list[dict]) -> None:
    """Beside the JSON: jobs per level over the first run; with several rates
    of one workload, latency and TTFT against the rate per policy, with the SLO line."""
    from fastserve.scheduler.sim.plot import PlotUnavailable, plot_occupancy, plot_rates

    stem = Path(out).with_suffix("")
    first = runs[0]
    title = f"{first['workload']} x{first['scale']} ({first['num_jobs']} jobs)"
    try:
        q = first["queues"]
        if q["t"]:
            plot_occupancy(f"{stem}.occupancy.png", q["t"], q["jobs_per_level"],
                           f"{title}, {first['policy'] or 'served'} at {first['rate']:g} req/s: jobs per queue")
        same = [r for r in runs if r["workload"] == first["workload"]]
        if len({r["rate"] for r in same}) > 1:
            norm: dict[str, list] = {}
            ttft: dict[str, list] = {}
            for r in same:
                name = r["policy"] or "served"
                norm.setdefault(name, []).append((r["rate"], r["real"]["norm_latency_s_per_token"].get("mean")))
                ttft.setdefault(name, []).append((r["rate"], r["real"]["ttft_s"].get("mean")))
            norm = {k: [p for p in v if p[1] is not None] for k, v in norm.items()}
            ttft = {k: [p for p in v if p[1] is not None] for k, v in ttft.items()}
            plot_rates(f"{stem}.png", norm, ttft, first["queues"]["slo"], f"{title}: served")
    except PlotUnavailable as exc:
        print(f"loadgen: {exc}; {out} is written, the plots are not", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
