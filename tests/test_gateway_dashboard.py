"""The gateway's dashboard endpoints on the in-memory bus: the API key (Bearer
or Basic) on every dashboard path, the JSON view's fields against snapshots
with known counters (rates, iteration split), the latency samples of real
requests, the stream, and a scheduler that stops reporting leaving the view."""
import asyncio
import base64
import json

import pytest

from fastserve.common import names
from fastserve.common.schemas import (
    CoreSnapshot, LoopTotals, SchedulerSnapshot, SnapshotCounters, SnapshotJob, SnapshotKV, SnapshotLevel, encode,
)
from gateway_fakes import EchoScheduler, gateway

pytestmark = pytest.mark.timeout(60)
KEY = "k-dash"


def snapshot(ts: float, *, finished: int, tokens: int, iterations: int, step: float, schedule: float,
             wall: float, back_to_back: int, jobs: int = 2, instance: str = "s1") -> SchedulerSnapshot:
    listed = [SnapshotJob(f"j{i}", 1, "running" if i < 2 else "waiting", "gpu", 5 + i, 0.002, 0, 12)
              for i in range(jobs)]
    core = CoreSnapshot(
        iteration=iterations, slo=0.2, num_jobs=jobs + 1, num_running=2,
        levels=[SnapshotLevel(0, 0.02, 0, 0, []), SnapshotLevel(1, 0.04, jobs + 1, 1, listed),
                SnapshotLevel(2, None, 0, 0, [])],
        kv=SnapshotKV(gpu_used=10, gpu_total=64, host_used=4, host_total=32, offloading=1, uploading=0),
        counters=SnapshotCounters(admitted=finished + 3, finished=finished, preemptions=2 * finished))
    loop = LoopTotals(iterations=iterations, tokens=tokens, step_seconds=step, schedule_seconds=schedule,
                      round_trip_seconds=step * 1.5, back_to_back=back_to_back, wall_seconds=wall)
    return SchedulerSnapshot(instance, ts, core, loop, replica="r0", model="tiny", policy="sj-mlfq",
                             kv_policy="proactive", max_batch_size=2)


async def publish(bus, snap: SchedulerSnapshot) -> None:
    await bus.publish(names.snapshot_key(snap.instance_id), encode(snap), exchange=names.EVENTS_EXCHANGE)


def basic(user: str, password: str) -> dict:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


async def test_every_dashboard_path_wants_the_key(memory_bus, tiny_model_dir):
    async with gateway(memory_bus, tiny_model_dir, api_key=KEY) as (client, _):
        for path in ("/dashboard", "/dashboard/snapshot", "/dashboard/stream", "/dashboard/static/dashboard.js"):
            resp = await client.get(path)
            assert resp.status == 401, path
            assert resp.headers["WWW-Authenticate"].startswith("Basic ")  # a browser asks for it
            assert (await client.get(path, headers=basic("me", "wrong"))).status == 401
        page = await client.get("/dashboard", headers={"Authorization": f"Bearer {KEY}"})
        assert page.status == 200 and page.content_type == "text/html"
        assert "/dashboard/static/dashboard.js" in await page.text()
        js = await client.get("/dashboard/static/dashboard.js", headers=basic("anyone", KEY))
        assert js.status == 200 and js.content_type == "text/javascript"
        assert (await client.get("/dashboard/static/../app.py", headers=basic("x", KEY))).status == 404
        # Basic auth is the browser's way into the dashboard only; the API keeps Bearer.
        assert (await client.get("/v1/models", headers=basic("x", KEY))).status == 401
        assert (await client.get("/health")).status == 503  # no backend, but no key asked


async def test_the_json_view_of_known_snapshots(memory_bus, tiny_model_dir):
    async with gateway(memory_bus, tiny_model_dir) as (client, _):
        await publish(memory_bus, snapshot(100.0, finished=10, tokens=500, iterations=40, step=0.4, schedule=0.02,
                                           wall=0.5, back_to_back=38))
        await publish(memory_bus, snapshot(102.0, finished=14, tokens=700, iterations=60, step=0.6, schedule=0.03,
                                           wall=0.76, back_to_back=58))
        for _ in range(100):
            view = await (await client.get("/dashboard/snapshot")).json()
            if view["replicas"] and view["replicas"][0]["iteration"] == 60:
                break
            await asyncio.sleep(0.02)
        (r,) = view["replicas"]
        assert (r["instance_id"], r["replica"], r["policy"], r["kv_policy"], r["max_batch_size"]) == (
            "s1", "r0", "sj-mlfq", "proactive", 2)
        assert [(lv["level"], lv["quantum"], lv["num_jobs"], lv["more"]) for lv in r["levels"]] == [
            (0, 0.02, 0, 0), (1, 0.04, 3, 1), (2, None, 0, 0)]
        assert r["levels"][1]["jobs"][0] == {"job_id": "j0", "level": 1, "state": "running", "kv": "gpu",
                                             "generated": 5, "charge": 0.002, "join_level": 0, "prompt_len": 12}
        assert r["kv"] == {"gpu_used": 10, "gpu_total": 64, "host_used": 4, "host_total": 32, "offloading": 1,
                           "uploading": 0}
        assert r["counters"]["finished"] == 14 and r["tokens"] == 700 and r["slo"] == 0.2
        # Over the 2 s between the snapshots: 4 finished, 8 preemptions, 200 tokens, 20 iterations.
        assert r["rates"]["finished"] == pytest.approx(2.0)
        assert r["rates"]["preemptions"] == pytest.approx(4.0)
        assert r["rates"]["tokens"] == pytest.approx(100.0)
        # Per iteration: 10 ms step, 0.5 ms scheduling, 13 ms between results: 2.5 ms on the bus.
        loop = r["loop"]
        assert loop["step_ms"] == pytest.approx(10.0) and loop["schedule_ms"] == pytest.approx(0.5)
        assert loop["iteration_ms"] == pytest.approx(13.0) and loop["bus_ms"] == pytest.approx(2.5)


async def test_latency_of_recent_requests(memory_bus, tiny_model_dir):
    async with gateway(memory_bus, tiny_model_dir, echo=EchoScheduler(memory_bus, token_delay=0.01)) as (client, _):
        empty = (await (await client.get("/dashboard/snapshot")).json())["latency"]
        assert empty["requests"] == 0 and empty["ttft"]["count"] == 0 and empty["ttft"]["p50"] is None
        for stream in (False, True):
            resp = await client.post("/v1/completions", json={"model": "tiny", "prompt": "hello world", "n": 2,
                                                              "max_tokens": 5, "stream": stream})
            await resp.read()
        lat = (await (await client.get("/dashboard/snapshot")).json())["latency"]
        assert lat["requests"] == 2
        assert lat["ttft"]["count"] == 2 and lat["norm_latency"]["count"] == 4  # one per choice
        assert sum(lat["ttft"]["hist"]) == 2 and len(lat["ttft"]["hist"]) == len(lat["bin_edges"]) - 1
        # 5 tokens 10 ms apart: more than 8 ms per token, less than a second.
        assert 0.008 < lat["norm_latency"]["p50"] < 1.0


async def test_the_stream_and_a_scheduler_that_goes_quiet(memory_bus, tiny_model_dir):
    async with gateway(memory_bus, tiny_model_dir, health_timeout=1.0) as (client, _):
        await publish(memory_bus, snapshot(1.0, finished=0, tokens=0, iterations=0, step=0, schedule=0, wall=0,
                                           back_to_back=0, jobs=300))
        resp = await client.get("/dashboard/stream")
        assert resp.headers["Content-Type"] == "text/event-stream"
        views = []
        async for line in resp.content:  # until the scheduler has not been heard for health_timeout
            if line.startswith(b"data: "):
                views.append(json.loads(line[6:]))
                if not views[-1]["replicas"]:
                    break
        resp.close()
        assert len(views) >= 3  # about 3 a second, for at least the second the scheduler stays in view
        first = views[0]["replicas"][0]
        assert len(first["levels"][1]["jobs"]) == 300
        assert views[-1]["replicas"] == []  # not heard for health_timeout: gone from the view
