"""Multi-process deployment: `fastserve kvstore|worker|scheduler|gateway` as four
separate processes on RabbitMQ, configured only through FASTSERVE_* variables,
serve an openai-client request; one trace id can be followed through the JSON
logs of gateway, scheduler and worker."""
from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import uuid

import pytest

from test_e2e_openai import fastserve_generate, free_port, wait_healthy

pytestmark = pytest.mark.rabbitmq


async def _cleanup_broker(url: str, namespace: str, replica: str) -> None:
    from fastserve.common import names
    from fastserve.common.bus_rabbit import RabbitBus

    bus = RabbitBus(url, namespace=namespace)
    await bus.connect()
    await bus.declare_queue(names.JOB_QUEUE, durable=True)
    for q in (names.scheduler_queue(replica), names.worker_queue(replica), names.kvstore_queue(replica)):
        await bus.declare_queue(q, durable=False)
    await bus.delete_declared()
    await bus.close()


async def test_four_processes_on_rabbitmq_serve_a_request(rabbitmq_url, tiny_model_dir, tmp_path):
    import openai

    namespace, replica, port = f"mp-{uuid.uuid4().hex[:8]}", f"r{uuid.uuid4().hex[:6]}", free_port()
    env = {**os.environ, "FASTSERVE_BROKER": rabbitmq_url, "FASTSERVE_NAMESPACE": namespace,
           "FASTSERVE_MODEL": str(tiny_model_dir), "FASTSERVE_REPLICA": replica, "FASTSERVE_HOST": "127.0.0.1",
           "FASTSERVE_PORT": str(port), "FASTSERVE_GPU_KV_BLOCKS": "64", "FASTSERVE_HOST_KV_BLOCKS": "32",
           "FASTSERVE_HOST_KV_PATH": str(tmp_path / "pool.bin"),
           "FASTSERVE_LOG_LEVEL": "DEBUG"}  # the per-job lines that carry the ids are DEBUG
    procs, logs = {}, {}
    try:
        for service in ("kvstore", "worker", "scheduler", "gateway"):
            logs[service] = open(tmp_path / f"{service}.log", "wb")
            procs[service] = subprocess.Popen([sys.executable, "-m", "fastserve.deploy.cli", service], env=env,
                                              stdout=logs[service], stderr=subprocess.STDOUT)
        base = f"http://127.0.0.1:{port}"
        try:
            await wait_healthy(base, timeout=60)
        except TimeoutError:
            dead = {s: p.poll() for s, p in procs.items() if p.poll() is not None}
            tails = {s: (tmp_path / f"{s}.log").read_text()[-1500:] for s in procs}
            raise AssertionError(f"stack never healthy; exited: {dead}; logs: {tails}") from None
        client = openai.AsyncOpenAI(base_url=f"{base}/v1", api_key="unused")
        model = (await client.models.list()).data[0].id
        want = fastserve_generate(tiny_model_dir, "hello there", 8)
        r = await client.completions.create(model=model, prompt="hello there", max_tokens=8, temperature=0)
        assert r.choices[0].text == want["text"]
        await client.close()
        await asyncio.sleep(0.3)  # let the last log lines land
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        codes = {}
        for s, p in procs.items():
            try:
                codes[s] = p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
                codes[s] = "killed"
        for f in logs.values():
            f.close()
        await _cleanup_broker(rabbitmq_url, namespace, replica)
    assert all(c == 0 for c in codes.values()), codes
    # One id followed across processes: the scheduler's "job received" line names it.
    lines = {s: [json.loads(x) for x in (tmp_path / f"{s}.log").read_text().splitlines() if x.startswith("{")]
             for s in procs}
    trace = next(x["trace_id"] for x in lines["scheduler"] if x.get("event") == "job received")
    seen = {s for s, ls in lines.items() if any(x.get("trace_id") == trace for x in ls)}
    assert {"gateway", "scheduler", "worker"} <= seen, seen
