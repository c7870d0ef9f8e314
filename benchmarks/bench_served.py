"""Served vs offline throughput: what the services cost over the engine alone.

N concurrent greedy streams of T tokens (ignore_eos) against a running stack,
compared with the offline `LLM.generate` of the same N prompts in the same
run (the baseline), for each deployment asked for:

- `memory`: `fastserve up` (one process, in-memory bus);
- `rabbitmq-up`: `fastserve up --broker amqp://...` (one process on RabbitMQ);
- `rabbitmq-4p`: kvstore, worker, scheduler and gateway as four processes on RabbitMQ.

The stack runs in its own process(es); the load comes from this one. Also
reported: the worker's busy fraction (engine step time / wall time while the
streams run, from the scheduler's counters on /metrics).

    python benchmarks/bench_served.py --deployments memory,rabbitmq-4p --out benchmarks/results/served.json
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path


def die_with_parent() -> None:
    """In a child process: SIGKILL when the benchmark dies, however it dies
    (no orphaned service left running on the machine)."""
    import ctypes

    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prompts(n: int, length: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 1000) for _ in range(length)] for _ in range(n)]


def offline(model: str, ps: list[list[int]], max_tokens: int, threads: int | None) -> dict:
    import torch

    from fastserve import LLM, SamplingParams

    if threads:
        torch.set_num_threads(threads)
    llm = LLM(model, max_batch_size=len(ps))
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    llm.generate(ps[:2], SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True))  # warm-up
    t0 = time.perf_counter()
    outs = llm.generate(ps, params)
    wall = time.perf_counter() - t0
    tokens = sum(len(o.token_ids) for o in outs)
    return {"tokens": tokens, "wall_s": wall, "tok_s": tokens / wall, "outputs": [o.token_ids for o in outs]}


async def _metric(http, base: str, name: str) -> float:
    async with http.get(f"{base}/metrics") as r:
        text = await r.text()
    return sum(float(m.group(1)) for m in re.finditer(rf"^{re.escape(name)}_total{{[^}}]*}} (\S+)$", text, re.M))


async def load(base: str, model_name: str, ps: list[list[int]], max_tokens: int) -> dict:
    import aiohttp

    async def one(http, prompt) -> list[int]:
        body = {"model": model_name, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                "ignore_eos": True, "stream": True, "logprobs": 0}
        toks = 0
        async with http.post(f"{base}/v1/completions", json=body) as r:
            assert r.status == 200, await r.text()
            async for line in r.content:
                if line.startswith(b"data: {"):
                    chunk = json.loads(line[6:])
                    lp = chunk["choices"][0].get("logprobs")
                    toks += len(lp["tokens"]) if lp else 0
        return toks

    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(timeout=timeout) as http:
        await one(http, ps[0][:8])  # warm-up (also waits for the first iteration's compile paths)
        step0 = await _metric(http, base, "fastserve:worker_step_seconds")
        it0 = await _metric(http, base, "fastserve:iterations")
        t0 = time.perf_counter()
        counts = await asyncio.gather(*(one(http, p) for p in ps))
        wall = time.perf_counter() - t0
        await asyncio.sleep(1.2)  # the scheduler's stats come twice a second
        step1 = await _metric(http, base, "fastserve:worker_step_seconds")
        it1 = await _metric(http, base, "fastserve:iterations")
    tokens = sum(counts)
    return {"tokens": tokens, "wall_s": wall, "tok_s": tokens / wall, "iterations": it1 - it0,
            "worker_busy_fraction": (step1 - step0) / wall if step1 > step0 else None}


async def wait_healthy(base: str, procs, timeout: float = 180.0) -> None:
    import aiohttp

    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as http:
        while time.monotonic() < deadline:
            for name, p in procs.items():
                if p.poll() is not None:
                    raise RuntimeError(f"{name} exited with {p.returncode}")
            try:
                async with http.get(f"{base}/health") as r:
                    if r.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.2)
    raise TimeoutError(f"{base}/health never became 200")


def start(deployment: str, model: str, broker: str, threads: int | None, logdir: Path, gpu_kv_blocks: int):
    port = free_port()
    env = {**os.environ, "FASTSERVE_MODEL": model, "FASTSERVE_PORT": str(port), "FASTSERVE_HOST": "127.0.0.1",
           "FASTSERVE_LOG_LEVEL": "WARNING", "FASTSERVE_GPU_KV_BLOCKS": str(gpu_kv_blocks),
           "FASTSERVE_NAMESPACE": f"bench-{uuid.uuid4().hex[:8]}", "FASTSERVE_REPLICA": f"b{port}"}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    if deployment != "memory":
        env["FASTSERVE_BROKER"] = broker
    services = ("kvstore", "worker", "scheduler", "gateway") if deployment == "rabbitmq-4p" else ("up",)
    procs = {}
    for s in services:
        log = open(logdir / f"{deployment}-{s}.log", "wb")
        procs[s] = subprocess.Popen([sys.executable, "-m", "fastserve.cli", s], env=env, stdout=log,
                                    stderr=subprocess.STDOUT, preexec_fn=die_with_parent)
    return f"http://127.0.0.1:{port}", procs


def stop(procs) -> None:
    for p in procs.values():
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in procs.values():
        try:
            p.wait(timeout=20)
        except subprocess.TimeoutExpired:
            p.kill()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", help="checkpoint (default: the `small` random model `fastserve up` makes)")
    ap.add_argument("--streams", type=int, default=32)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--deployments", default="memory,rabbitmq-up,rabbitmq-4p")
    ap.add_argument("--broker", default="amqp://guest:guest@127.0.0.1:5672/")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (offline and worker)")
    ap.add_argument("--gpu-kv-blocks", type=int, default=1024)
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    from fastserve.launcher import ensure_default_model

    model = args.model or str(ensure_default_model("~/.cache/fastserve/models"))
    ps = prompts(args.streams, args.prompt_len)
    report: dict = {"model": model, "streams": args.streams, "prompt_len": args.prompt_len,
                    "max_tokens": args.max_tokens, "threads": args.threads, "cpus": os.cpu_count()}
    off = offline(model, ps, args.max_tokens, args.threads)
    report["offline"] = {k: v for k, v in off.items() if k != "outputs"}
    logdir = Path(tempfile.mkdtemp(prefix="bench-served-"))
    name = Path(model).resolve().name
    for dep in [d.strip() for d in args.deployments.split(",") if d.strip()]:
        base, procs = start(dep, model, args.broker, args.threads, logdir, args.gpu_kv_blocks)
        try:
            asyncio.run(wait_healthy(base, procs))
            served = asyncio.run(load(base, name, ps, args.max_tokens))
        finally:
            stop(procs)
        served["served_over_offline"] = served["tok_s"] / off["tok_s"]
        report[dep] = served
        print(json.dumps({dep: served}), file=sys.stderr)
    report["logs"] = str(logdir)
    text = json.dumps(report, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
