"""Chaos run: the four-process deployment (two gateways) on a RabbitMQ node of
its own, under steady load of greedy and seeded streams, while one thing at a
time fails: SIGKILL of the worker, the scheduler, the KV store, one of the
two gateways, and a broker stop; each is restarted after a pause.

Every request's text is compared with an undisturbed offline run of the same
prompt and sampling parameters. Per fault: requests sent, completed
identical, completed different (must be 0), explicit errors (and why),
refused (connection refused by a dead gateway: nothing was accepted), hung
past the deadline (must be 0), and recovery seconds (restart -> the first
request sent after it completes).

Loopback only. The broker node is started in a temporary directory on a free
port and stopped at the end; the shared broker on 5672 is never touched.

    python benchmarks/chaos.py --out benchmarks/results/chaos.json
    python benchmarks/chaos.py --short            # what CI runs (tests/test_chaos.py)
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

RABBIT_BIN = Path("/usr/lib/rabbitmq/bin")
_CLEANUP: list = []  # run however the run ends (a SIGTERM included): no broker node left behind
FAULTS = ("worker", "scheduler", "kvstore", "gateway", "broker")


def die_with_parent() -> None:
    """In a child process: SIGKILL when the benchmark dies, however it dies
    (no orphaned service left running on the machine)."""
    import ctypes

    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_open(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), 0.5).close()
        return True
    except OSError:
        return False


class PrivateBroker:
    """A RabbitMQ node of this run's own (name, ports, data in a temp dir)."""

    def __init__(self, workdir: Path) -> None:
        self.dir = workdir / "rabbitmq"
        self.dir.mkdir(parents=True)
        self.port = free_port()
        self.node = f"chaos{self.port}@localhost"
        (self.dir / "rabbitmq.conf").write_text(f"listeners.tcp.local = 127.0.0.1:{self.port}\n"
                                                "loopback_users = none\n")
        (self.dir / "enabled_plugins").write_text("[].\n")
        (self.dir / "env.conf").write_text("")
        self.env = {**os.environ, "HOME": str(self.dir), "RABBITMQ_NODENAME": self.node,
                    "RABBITMQ_NODE_PORT": str(self.port), "RABBITMQ_DIST_PORT": str(free_port()),
                    "RABBITMQ_MNESIA_BASE": str(self.dir / "mnesia"), "RABBITMQ_LOG_BASE": str(self.dir / "log"),
                    "RABBITMQ_CONFIG_FILE": str(self.dir / "rabbitmq"), "RABBITMQ_PID_FILE": str(self.dir / "pid"),
                    "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.dir / "enabled_plugins"),
                    "RABBITMQ_CONF_ENV_FILE": str(self.dir / "env.conf")}

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}/"

    def _bin(self, name: str) -> str:
        local = RABBIT_BIN / name
        return str(local) if local.exists() else shutil.which(name) or name

    def start(self, timeout: float = 60.0) -> None:
        subprocess.run([self._bin("rabbitmq-server"), "-detached"], env=self.env, check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while not port_open(self.port):
            if time.monotonic() > deadline:
                raise TimeoutError(f"RabbitMQ node {self.node} did not open port {self.port}")
            time.sleep(0.3)

    def stop(self) -> None:
        subprocess.run([self._bin("rabbitmqctl"), "-n", self.node, "stop"], env=self.env,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=60)
        deadline = time.monotonic() + 30
        while port_open(self.port) and time.monotonic() < deadline:
            time.sleep(0.2)


class Deployment:
    """kvstore, worker, scheduler and two gateways, one process each."""

    SERVICES = ("kvstore", "worker", "scheduler", "gateway", "gateway2")

    def __init__(self, model: str, broker: PrivateBroker, workdir: Path, settings: dict) -> None:
        self.ports = {"gateway": free_port(), "gateway2": free_port()}
        self.env = {**os.environ, "FASTSERVE_MODEL": model, "FASTSERVE_BROKER": broker.url,
                    "FASTSERVE_NAMESPACE": f"chaos-{uuid.uuid4().hex[:6]}", "FASTSERVE_HOST": "127.0.0.1",
                    "FASTSERVE_HOST_KV_DIR": str(workdir), "FASTSERVE_LOG_LEVEL": os.environ.get("CHAOS_LOG_LEVEL", "INFO"),
                    **{f"FASTSERVE_{k.upper()}": str(v) for k, v in settings.items()}}
        self.logs = workdir / "logs"
        self.logs.mkdir()
        self.procs: dict[str, subprocess.Popen] = {}
        self.restarts: Counter = Counter()

    def start(self, service: str) -> None:
        cmd = "gateway" if service.startswith("gateway") else service
        env = dict(self.env)
        if cmd == "gateway":
            env["FASTSERVE_PORT"] = str(self.ports[service])
        n = self.restarts[service]
        self.restarts[service] += 1
        log = open(self.logs / f"{service}.{n}.log", "wb")
        self.procs[service] = subprocess.Popen([sys.executable, "-m", "fastserve.cli", cmd], env=env, stdout=log,
                                               stderr=subprocess.STDOUT, preexec_fn=die_with_parent)

    def kill(self, service: str) -> None:
        p = self.procs[service]
        if p.poll() is None:
            p.send_signal(signal.SIGKILL)
            p.wait(10)

    def stop_all(self) -> dict:
        for p in self.procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        codes = {}
        for s, p in self.procs.items():
            try:
                codes[s] = p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
                codes[s] = "killed"
        return codes

    def urls(self) -> list[str]:
        return [f"http://127.0.0.1:{self.ports[g]}" for g in ("gateway", "gateway2")]


@dataclass
class Req:
    phase: str
    kind: str  # "greedy" | "seeded"
    prompt: int
    gateway: int
    sent: float
    done: float | None = None
    text: str | None = None
    error: str | None = None
    refused: bool = False


def request_specs(n_prompts: int, seed: int = 0) -> tuple[list[str], list[dict]]:
    rng = random.Random(seed)
    words = ["river", "stone", "light", "quiet", "north", "engine", "paper", "garden", "signal", "winter",
             "orange", "market", "silver", "window", "forest", "letter"]
    texts = [" ".join(rng.choice(words) for _ in range(rng.randint(6, 40))) for _ in range(n_prompts)]
    specs = []
    for i in range(n_prompts):
        specs.append({"temperature": 0.0, "max_tokens": 24 + (i % 3) * 12})
        specs.append({"temperature": 0.9, "top_p": 0.95, "seed": 1000 + i, "max_tokens": 24 + (i % 3) * 12})
    return texts, specs


def references(model: str, texts: list[str], specs: list[dict]) -> list[str]:
    """The undisturbed outputs: the offline engine, same prompts and parameters."""
    from fastserve import LLM, SamplingParams

    llm = LLM(model)
    prompts = [texts[i // 2] for i in range(len(specs))]
    params = [SamplingParams(ignore_eos=True, **{k: v for k, v in s.items()}) for s in specs]
    return [o.text for o in llm.generate(prompts, params)]


async def one_request(http, url: str, model: str, text: str, spec: dict, deadline: float, r: Req) -> None:
    import aiohttp

    body = {"model": model, "prompt": text, "stream": True, "ignore_eos": True, **spec}
    out = []
    try:
        async with http.post(f"{url}/v1/completions", json=body,
                             timeout=aiohttp.ClientTimeout(total=deadline)) as resp:
            if resp.status != 200:
                r.error = f"HTTP {resp.status}: {(await resp.text())[:200]}"
                return
            async for line in resp.content:
                if not line.startswith(b"data: "):
                    continue
                if line.startswith(b"data: [DONE]"):
                    r.text = "".join(out)
                    return
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    r.error = f"stream error: {chunk['error'].get('message', '')[:200]}"
                    return
                out.append(chunk["choices"][0]["text"])
            r.error = "stream ended without [DONE] (connection lost)"
    except aiohttp.ClientConnectorError:
        r.refused = True
        r.error = "connection refused"
    except asyncio.TimeoutError:
        r.error = "HUNG"
    except (aiohttp.ClientError, ConnectionError) as exc:
        r.error = f"connection lost: {type(exc).__name__}"
    finally:
        r.done = time.monotonic()


async def run(args) -> dict:
    import aiohttp

    from fastserve.launcher import ensure_default_model

    work = Path(tempfile.mkdtemp(prefix="chaos-"))
    if args.model:
        model = args.model
    elif args.short:
        from fastserve.gpu_worker.model_maker import make_model

        model = str(make_model(work / "tiny", preset="tiny"))
    else:
        model = str(ensure_default_model("~/.cache/fastserve/models"))
    texts, specs = request_specs(args.prompts)
    t0 = time.monotonic()
    refs = references(model, texts, specs)
    print(f"chaos: references of {len(refs)} requests in {time.monotonic() - t0:.1f}s", file=sys.stderr)
    broker = PrivateBroker(work)
    _CLEANUP.append(broker.stop)
    broker.start()
    settings = {"heartbeat_interval": 0.5, "worker_timeout": 3, "kvstore_timeout": 3, "health_timeout": 3,
                "worker_grace": 120, "request_timeout": args.deadline, "gpu_kv_blocks": args.gpu_kv_blocks,
                "host_kv_blocks": 4 * args.gpu_kv_blocks, "max_batch_size": 16, "copy_timeout": 10}
    dep = Deployment(model, broker, work, settings)
    _CLEANUP.insert(0, dep.stop_all)
    for s in Deployment.SERVICES:
        dep.start(s)
    model_name = Path(model).resolve().name
    reqs: list[Req] = []
    events: dict[str, dict] = {}
    stop_load = asyncio.Event()
    phase = {"name": "warmup"}
    try:
        await _wait_healthy(dep.urls(), timeout=240)

        async def client(k: int, http) -> None:
            i = k
            while not stop_load.is_set():
                j = i % len(specs)
                r = Req(phase["name"], "greedy" if j % 2 == 0 else "seeded", j, i % 2, time.monotonic())
                reqs.append(r)
                await one_request(http, dep.urls()[r.gateway], model_name, texts[j // 2], specs[j],
                                  args.deadline + 30, r)
                if r.refused or (r.error or "").startswith("HTTP 503"):
                    await asyncio.sleep(0.2)  # like a client backing off: count attempts, not a busy loop
                i += args.clients

        async with aiohttp.ClientSession() as http:
            tasks = [asyncio.create_task(client(k, http)) for k in range(args.clients)]
            await asyncio.sleep(args.warmup)
            for fault in args.faults:
                phase["name"] = fault
                await asyncio.sleep(args.before)
                ev = events[fault] = {"at": time.monotonic()}
                print(f"chaos: {fault} fails", file=sys.stderr)
                if fault == "broker":
                    await asyncio.to_thread(broker.stop)
                else:
                    dep.kill("gateway" if fault == "gateway" else fault)
                await asyncio.sleep(args.down)
                if fault == "broker":
                    await asyncio.to_thread(broker.start)
                else:
                    dep.start("gateway" if fault == "gateway" else fault)
                ev["restarted"] = time.monotonic()
                print(f"chaos: {fault} restarted", file=sys.stderr)
                await asyncio.sleep(args.after)
            phase["name"] = "end"
            stop_load.set()
            await asyncio.gather(*tasks)
    finally:
        codes = dep.stop_all()
    return {"model": model, "clients": args.clients, "deadline_s": args.deadline, "settings": settings,
            "faults": _table(reqs, refs, events, args.faults), "exit_codes": codes, "workdir": str(work)}


async def _wait_healthy(urls: list[str], timeout: float) -> None:
    import aiohttp

    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as http:
        for url in urls:
            while True:
                try:
                    async with http.get(f"{url}/health") as r:
                        if r.status == 200:
                            break
                except aiohttp.ClientError:
                    pass
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{url}/health never became 200")
                await asyncio.sleep(0.3)


def _table(reqs: list[Req], refs: list[str], events: dict, faults) -> dict:
    out = {}
    for fault in ("warmup", *faults):
        rs = [r for r in reqs if r.phase == fault]
        ok = [r for r in rs if r.error is None]
        same = [r for r in ok if r.text == refs[r.prompt]]
        ev = events.get(fault, {})
        # Recovery: the first request sent after the restart (in any later phase) to complete.
        after = [r for r in reqs if r.error is None and "restarted" in ev and r.sent >= ev["restarted"]]
        row = {"sent": len(rs), "identical": len(same), "different": len(ok) - len(same),
               "errors": sum(1 for r in rs if r.error and not r.refused and r.error != "HUNG"),
               "refused": sum(1 for r in rs if r.refused), "hung": sum(1 for r in rs if r.error == "HUNG"),
               "error_reasons": dict(Counter(r.error for r in rs if r.error and not r.refused).most_common(5)),
               "different_kinds": dict(Counter(r.kind for r in ok if r.text != refs[r.prompt]))}
        if after:
            row["recovery_s"] = round(min(r.done for r in after) - ev["restarted"], 2)
        out[fault] = row
    return out


def _interrupted(signum, frame) -> None:
    raise KeyboardInterrupt  # so that the cleanups below run on SIGTERM too


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", help="checkpoint (default: the `small` random model; --short: a tiny one)")
    ap.add_argument("--short", action="store_true", help="the CI version: tiny model, short phases")
    ap.add_argument("--faults", default=",".join(FAULTS))
    ap.add_argument("--clients", type=int, default=None)
    ap.add_argument("--prompts", type=int, default=12)
    ap.add_argument("--deadline", type=float, default=120.0, help="request timeout given to the gateways")
    ap.add_argument("--gpu-kv-blocks", type=int, default=None, help="small, to keep jobs swapping")
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    args.faults = [f.strip() for f in args.faults.split(",") if f.strip()]
    bad = [f for f in args.faults if f not in FAULTS]
    if bad:
        ap.error(f"unknown fault(s) {bad}; choose from {FAULTS}")
    if args.short:
        args.clients = args.clients or 6
        args.gpu_kv_blocks = args.gpu_kv_blocks or 24
        args.warmup, args.before, args.down, args.after = 3.0, 2.0, 3.0, 8.0
    else:
        args.clients = args.clients or 12
        args.gpu_kv_blocks = args.gpu_kv_blocks or 48
        args.warmup, args.before, args.down, args.after = 8.0, 5.0, 8.0, 20.0
    signal.signal(signal.SIGTERM, _interrupted)
    try:
        report = asyncio.run(run(args))
    finally:
        for stop in _CLEANUP:
            try:
                stop()
            except Exception as exc:  # noqa: BLE001 - the next cleanups must still run
                print(f"chaos: cleanup failed: {exc}", file=sys.stderr)
        _CLEANUP.clear()
    text = json.dumps(report, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    bad_rows = {f: r for f, r in report["faults"].items() if r["different"] or r["hung"]}
    return 1 if bad_rows else 0


if __name__ == "__main__":
    sys.exit(main())
