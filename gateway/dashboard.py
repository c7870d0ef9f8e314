"""The dashboard: what the schedulers are doing, live, for people and tools.

Every scheduler broadcasts a `SchedulerSnapshot` a few times a second (its
MLFQ levels and their first jobs, KV placement, cumulative counters and loop
timings). The gateway keeps the latest one per scheduler with a few seconds
of their counters (for per-second rates), and the TTFT and normalized
latency of its own recent requests, and serves:

    GET /dashboard            the page (gateway/static/: no build step, no CDN)
    GET /dashboard/static/X   its script and style sheet
    GET /dashboard/snapshot   the view as JSON (fields: docs/services.md)
    GET /dashboard/stream     the same view as server-sent events, UPDATES_PER_SECOND a second

The view is built once per tick for every open stream, and only while one is
open. All of them honour --api-key (gateway/app.py), as Bearer or as the
password of HTTP Basic auth, which a browser asks for by itself.
"""
from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import asdict
from pathlib import Path

import numpy as np
import orjson
import structlog
from aiohttp import web

from fastserve.common import names
from fastserve.common.bus import Bus, Subscription
from fastserve.common.schemas import SchedulerSnapshot, decode

log = structlog.get_logger("fastserve.gateway")

UPDATES_PER_SECOND = 3
RATE_WINDOW = 1.0  # seconds of counters a rate is taken over (at least)
HISTORY = 40  # snapshots kept per scheduler for rates (10 s at 4 a second)
LATENCY_SAMPLES = 1000  # recent requests kept
LATENCY_WINDOW = 300.0  # seconds: older requests are left out of the distributions
# Histogram bins of the latency distributions: 4 per decade from 1 ms to 100 s.
BIN_EDGES = [round(10 ** (-3 + i / 4), 6) for i in range(21)]
RATE_COUNTERS = ("admitted", "finished", "preemptions", "demotions", "promotions", "offloads", "uploads", "drops")
_STATIC = Path(__file__).with_name("static")
_STATIC_TYPES = {"dashboard.js": "text/javascript", "dashboard.css": "text/css"}


class Dashboard:
    def __init__(self, bus: Bus, gateway_id: str, model: str, stale_after: float) -> None:
        self.bus = bus
        self.gateway_id = gateway_id
        self.model = model
        self.stale_after = stale_after
        self._latest: dict[str, tuple[float, SchedulerSnapshot]] = {}  # instance -> (received (monotonic), latest)
        self._history: dict[str, deque[SchedulerSnapshot]] = {}
        self._latency: deque[tuple[float, float | None, list[float]]] = deque(maxlen=LATENCY_SAMPLES)
        self._sub: Subscription | None = None
        self._listeners = 0
        self._someone = asyncio.Event()
        self._tick = asyncio.Condition()
        self._payload = b""
        self._version = 0
        self._closing = False

    # ------------------------------------------------------------------ inputs
    async def start(self) -> None:
        queue = names.dashboard_queue(self.gateway_id)
        await self.bus.declare_exchange(names.EVENTS_EXCHANGE)
        await self.bus.declare_queue(queue, durable=False, exclusive=True, auto_delete=True,
                                     bindings=[(names.EVENTS_EXCHANGE, names.SNAPSHOT_PATTERN)])
        self._sub = await self.bus.consume(queue, self._on_snapshot, prefetch=16)

    async def stop(self) -> None:
        if self._sub is not None:
            await self._sub.cancel()
            self._sub = None

    async def _on_snapshot(self, body: bytes, headers: dict) -> None:
        self.add(decode(body, SchedulerSnapshot))

    def add(self, snap: SchedulerSnapshot) -> None:
        self._latest[snap.instance_id] = (time.monotonic(), snap)
        self._history.setdefault(snap.instance_id, deque(maxlen=HISTORY)).append(snap)

    def observe_request(self, ttft: float | None, norm_latencies: list[float]) -> None:
        """A request finished: its time to first token and each choice's
        normalized latency (seconds / output token)."""
        self._latency.append((time.monotonic(), ttft, norm_latencies))

    # ------------------------------------------------------------------ the view
    def view(self) -> dict:
        now = time.monotonic()
        for instance, (seen, _) in list(self._latest.items()):
            if now - seen > self.stale_after:
                del self._latest[instance], self._history[instance]
        replicas = [_replica(snap, now - seen, self._history[snap.instance_id])
                    for seen, snap in sorted(self._latest.values(), key=lambda x: (x[1].replica, x[1].instance_id))]
        return {"ts": time.time(), "gateway": self.gateway_id, "model": self.model, "replicas": replicas,
                "latency": self._latency_view(now)}

    def _latency_view(self, now: float) -> dict:
        recent = [(t, ttft, norm) for t, ttft, norm in self._latency if now - t <= LATENCY_WINDOW]
        return {"window_s": LATENCY_WINDOW, "requests": len(recent), "bin_edges": BIN_EDGES,
                "ttft": _distribution([ttft for _, ttft, _ in recent if ttft is not None]),
                "norm_latency": _distribution([x for _, _, norm in recent for x in norm])}

    def payload(self) -> bytes:
        return orjson.dumps(self.view())

    # ------------------------------------------------------------------ the stream
    async def run_publisher(self) -> None:
        """Background task: a new payload each tick while a stream is open."""
        while True:
            await self._someone.wait()
            payload = self.payload()
            async with self._tick:
                self._payload, self._version = payload, self._version + 1
                self._tick.notify_all()
            await asyncio.sleep(1 / UPDATES_PER_SECOND)

    @contextlib.contextmanager
    def listening(self):
        self._listeners += 1
        self._someone.set()
        try:
            yield
        finally:
            self._listeners -= 1
            if not self._listeners:
                self._someone.clear()

    async def updates(self) -> AsyncIterator[bytes]:
        """Each new payload, until the gateway shuts down."""
        seen = 0
        with self.listening():
            while True:
                async with self._tick:
                    await self._tick.wait_for(lambda: self._closing or self._version > seen)
                    if self._closing:
                        return
                    seen, payload = self._version, self._payload
                yield payload

    async def close_streams(self) -> None:
        """on_shutdown: end the open streams (else shutdown waits for them)."""
        async with self._tick:
            self._closing = True
            self._tick.notify_all()


def _replica(snap: SchedulerSnapshot, age: float, history: deque[SchedulerSnapshot]) -> dict:
    core = snap.core
    out = {"instance_id": snap.instance_id, "replica": snap.replica, "age_s": round(age, 3), "policy": snap.policy,
           "kv_policy": snap.kv_policy, "max_batch_size": snap.max_batch_size, "iteration": core.iteration,
           "slo": core.slo, "num_jobs": core.num_jobs, "num_running": core.num_running,
           "levels": [asdict(lv) for lv in core.levels], "kv": asdict(core.kv), "counters": asdict(core.counters),
           "tokens": snap.loop.tokens}
    out.update(_rates(history))
    return out


def _rates(history: deque[SchedulerSnapshot]) -> dict:
    """Per-second rates and the mean iteration split over the last RATE_WINDOW
    seconds (at least) of this scheduler's snapshots."""
    new = history[-1]
    old = next((s for s in reversed(history) if new.ts - s.ts >= RATE_WINDOW), history[0])
    dt = new.ts - old.ts
    rates = {k: 0.0 for k in (*RATE_COUNTERS, "tokens")}
    split = {"iteration_ms": None, "schedule_ms": None, "step_ms": None, "bus_ms": None, "snapshot_ms": None}
    if dt > 0:
        for k in RATE_COUNTERS:
            rates[k] = max(getattr(new.core.counters, k) - getattr(old.core.counters, k), 0) / dt
        rates["tokens"] = max(new.loop.tokens - old.loop.tokens, 0) / dt
    a, b = old.loop, new.loop
    iters = b.iterations - a.iterations
    if iters > 0:
        step = (b.step_seconds - a.step_seconds) / iters
        schedule = (b.schedule_seconds - a.schedule_seconds) / iters
        split["step_ms"], split["schedule_ms"] = 1e3 * step, 1e3 * schedule
        # The rest of an iteration is messaging: the bus, (de)serializing, waiting for the event loop.
        if b.back_to_back > a.back_to_back:
            iteration = (b.wall_seconds - a.wall_seconds) / (b.back_to_back - a.back_to_back)
            split["iteration_ms"] = 1e3 * iteration
            split["bus_ms"] = 1e3 * max(iteration - step - schedule, 0.0)
        else:  # not back to back (light load): what a command's round trip adds to the step
            split["bus_ms"] = 1e3 * max((b.round_trip_seconds - a.round_trip_seconds) / iters - step, 0.0)
    if b.snapshots > a.snapshots:
        split["snapshot_ms"] = 1e3 * (b.snapshot_seconds - a.snapshot_seconds) / (b.snapshots - a.snapshots)
    return {"rates": rates, "loop": split}


def _distribution(values: list[float]) -> dict:
    if not values:
        return {"count": 0, "mean": None, "p50": None, "p90": None, "p99": None, "hist": [0] * (len(BIN_EDGES) - 1)}
    a = np.asarray(values)
    idx = np.clip(np.searchsorted(BIN_EDGES, a, side="right") - 1, 0, len(BIN_EDGES) - 2)
    p50, p90, p99 = np.percentile(a, [50, 90, 99])
    return {"count": len(values), "mean": float(a.mean()), "p50": float(p50), "p90": float(p90), "p99": float(p99),
            "hist": np.bincount(idx, minlength=len(BIN_EDGES) - 1).tolist()}


# ------------------------------------------------------------------ handlers

def _dashboard(request: web.Request) -> Dashboard:
    from fastserve.gateway.app import STATE

    return request.app[STATE].dashboard


async def page(request: web.Request) -> web.Response:
    return web.Response(body=(_STATIC / "dashboard.html").read_bytes(), content_type="text/html",
                        headers={"Cache-Control": "no-cache"})


async def static(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    if name not in _STATIC_TYPES:
        raise web.HTTPNotFound()
    return web.Response(body=(_STATIC / name).read_bytes(), content_type=_STATIC_TYPES[name],
                        headers={"Cache-Control": "no-cache"})


async def snapshot(request: web.Request) -> web.Response:
    return web.Response(body=_dashboard(request).payload(), content_type="application/json")


async def stream(request: web.Request) -> web.StreamResponse:
    from fastserve.gateway.app import ACCESS

    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await resp.prepare(request)
    try:
        async for payload in _dashboard(request).updates():
            await resp.write(b"data: " + payload + b"\n\n")
    except (ConnectionResetError, asyncio.CancelledError):
        request[ACCESS]["client_gone"] = True  # the viewer went away (aiohttp cancels the handler)
        raise
    with contextlib.suppress(ConnectionResetError):
        await resp.write_eof()
    return resp


def add_routes(app: web.Application) -> None:
    app.router.add_get("/dashboard", page)
    app.router.add_get("/dashboard/static/{name}", static)
    app.router.add_get("/dashboard/snapshot", snapshot)
    app.router.add_get("/dashboard/stream", stream)
