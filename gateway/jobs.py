"""The gateway's side of the bus: submit jobs, route their token events back,
cancel them, and watch heartbeats and scheduler stats (health, admission,
metrics)."""
from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

import structlog

from fastserve.common import names
from fastserve.common.bus import Bus, Subscription
from fastserve.common.metrics import Metrics
from fastserve.common.schemas import (
    Heartbeat, JobCancel, JobSubmit, SchedulerStats, TokenEvent, decode, encode,
)

from fastserve.gateway.config import GatewayConfig
from fastserve.gateway.protocol import APIError

log = structlog.get_logger("fastserve.gateway")


@dataclass
class Submission:
    """The jobs of one HTTP request; their events arrive on one queue as (choice index, event)."""

    trace_id: str
    job_ids: list[str]
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    finished: set[str] = field(default_factory=set)


class JobTracker:
    def __init__(self, config: GatewayConfig, bus: Bus, metrics: Metrics) -> None:
        self.config = config
        self.bus = bus
        self.metrics = metrics
        self.reply_queue = names.reply_queue(config.instance_id)
        self._routes: dict[str, tuple[Submission, int]] = {}
        self._pending_requests = 0
        self._heartbeats: dict[tuple[str, str], float] = {}  # (service, instance) -> last seen (monotonic)
        self._worker_limits: dict[str, int] = {}  # worker instance -> longest job its GPU KV pool holds
        self._stats: dict[str, tuple[float, SchedulerStats]] = {}
        self._cancels: asyncio.Queue[JobCancel] = asyncio.Queue()
        self._subs: list[Subscription] = []
        self._started = time.monotonic()

    # ------------------------------------------------------------ lifecycle (cleanup_ctx)
    async def start(self) -> None:
        await self.bus.declare_exchange(names.EVENTS_EXCHANGE)
        await self.bus.declare_exchange(names.CONTROL_EXCHANGE)
        # Declared here too, so jobs wait in the queue if no scheduler is up yet.
        await self.bus.declare_queue(names.JOB_QUEUE, durable=True)
        await self.bus.declare_queue(self.reply_queue, durable=False, exclusive=True, auto_delete=True)
        events_q = names.events_queue(self.config.instance_id)
        await self.bus.declare_queue(events_q, durable=False, exclusive=True, auto_delete=True, bindings=[
            (names.EVENTS_EXCHANGE, names.HEARTBEAT_PATTERN), (names.EVENTS_EXCHANGE, names.STATS_PATTERN)])
        self._subs.append(await self.bus.consume(self.reply_queue, self._on_reply, prefetch=256))
        self._subs.append(await self.bus.consume(events_q, self._on_event, prefetch=64))
        self._started = time.monotonic()

    async def stop(self) -> None:
        for sub in self._subs:
            await sub.cancel()
        self._subs.clear()
        for job_id in list(self._routes):  # jobs still running when the gateway goes away
            self._cancels.put_nowait(JobCancel(job_id, self._routes[job_id][0].trace_id, "gateway shutdown"))
        await self._send_cancels(drain=True)

    async def run_cancel_sender(self) -> None:
        """Background task: publishes cancels queued by `release` (handlers may be
        unwinding from a cancellation and must not await the broker themselves)."""
        await self._send_cancels(drain=False)

    async def run_heartbeat(self) -> None:
        """Background task: tell the deployment this gateway is alive."""
        while True:
            hb = Heartbeat("gateway", self.config.instance_id, time.time(), {
                "model": self.config.served_model_name, "pending_requests": self._pending_requests})
            try:
                await self.bus.publish(names.heartbeat_key("gateway", self.config.instance_id), encode(hb),
                                       exchange=names.EVENTS_EXCHANGE)
            except Exception:  # noqa: BLE001 - a broker hiccup must not end the heartbeat
                log.warning("gateway.heartbeat_failed", exc_info=True)
            await asyncio.sleep(self.config.health_timeout / 3)

    async def _send_cancels(self, drain: bool) -> None:
        while not (drain and self._cancels.empty()):
            msg = await self._cancels.get()
            try:
                await self.bus.publish(names.CANCEL_KEY, encode(msg), exchange=names.CONTROL_EXCHANGE)
                log.debug("job.cancel_sent", job_id=msg.job_id, trace_id=msg.trace_id, reason=msg.reason)
            except Exception:  # noqa: BLE001 - keep sending the others
                log.exception("job.cancel_failed", job_id=msg.job_id, trace_id=msg.trace_id)

    # ------------------------------------------------------------ admission
    def admit(self, num_jobs: int) -> None:
        """Raise APIError 429/503 when this request should not be queued."""
        if self._pending_requests >= self.config.max_pending_requests:
            raise APIError(429, f"Too many requests in flight at this gateway (limit "
                                f"{self.config.max_pending_requests}); retry later.", "rate_limit_error",
                           None, "rate_limit_exceeded")
        if self.config.require_backend:
            grace = time.monotonic() - self._started < self.config.health_timeout
            if not grace and not self.alive("scheduler"):
                raise APIError(503, f"No scheduler is alive (no heartbeat in the last "
                                    f"{self.config.health_timeout:g}s); the service is unavailable.",
                               "service_unavailable", None, "service_unavailable")
        live = self._live_stats()
        if live and all(s.max_queued_jobs and s.num_waiting + num_jobs > s.max_queued_jobs for s in live):
            waiting = sum(s.num_waiting for s in live)
            raise APIError(503, f"The job queue is full ({waiting} jobs waiting, limit "
                                f"{live[0].max_queued_jobs} per scheduler); retry later.",
                           "service_unavailable", None, "queue_full")

    def _live_stats(self) -> list[SchedulerStats]:
        now = time.monotonic()
        return [s for seen, s in self._stats.values() if now - seen < self.config.health_timeout]

    # ------------------------------------------------------------ jobs
    async def submit(self, trace_id: str, jobs: Iterable[tuple[str, list[int], dict]]) -> Submission:
        """Publish one JobSubmit per (job_id, prompt ids, sampling dict)."""
        jobs = list(jobs)
        sub = Submission(trace_id, [j for j, _, _ in jobs])
        self._pending_requests += 1
        try:
            for index, (job_id, prompt, sampling) in enumerate(jobs):
                self._routes[job_id] = (sub, index)
                msg = JobSubmit(job_id=job_id, trace_id=trace_id, reply_to=self.reply_queue,
                                prompt_token_ids=prompt, sampling=sampling, arrival_time=time.time(),
                                model=self.config.served_model_name)
                await self.bus.publish(names.JOB_QUEUE, encode(msg), {"trace_id": trace_id}, persistent=True)
        except BaseException:
            self.release(sub, reason="submit failed")
            raise
        return sub

    def release(self, sub: Submission, reason: str = "client disconnected") -> None:
        """Forget a request's jobs; cancel those not finished yet. Synchronous on purpose."""
        self._pending_requests -= 1
        for job_id in sub.job_ids:
            if self._routes.pop(job_id, None) is not None and job_id not in sub.finished:
                self._cancels.put_nowait(JobCancel(job_id, sub.trace_id, reason))

    def release_job(self, sub: Submission, job_id: str, reason: str) -> None:
        """Cancel one job of a request now (a stop string matched) and ignore its later events."""
        if job_id not in sub.finished:
            sub.finished.add(job_id)
            self._routes.pop(job_id, None)
            self._cancels.put_nowait(JobCancel(job_id, sub.trace_id, reason))

    def mark_finished(self, sub: Submission, job_id: str) -> None:
        sub.finished.add(job_id)

    async def _on_reply(self, body: bytes, headers: dict) -> None:
        ev = decode(body, TokenEvent)
        route = self._routes.get(ev.job_id)
        if route is None:
            log.debug("job.event_for_unknown_job", job_id=ev.job_id, trace_id=ev.trace_id)
            return
        sub, index = route
        sub.events.put_nowait((index, ev))

    async def _on_event(self, body: bytes, headers: dict) -> None:
        msg = decode(body, (Heartbeat, SchedulerStats))
        now = time.monotonic()
        if isinstance(msg, Heartbeat):
            self._heartbeats[(msg.service, msg.instance_id)] = now
            if msg.service == "worker" and "num_gpu_blocks" in msg.info:
                info = msg.info
                self._worker_limits[msg.instance_id] = min(int(info["max_model_len"]),
                                                           int(info["num_gpu_blocks"]) * int(info["block_size"]))
        else:
            self._stats[msg.instance_id] = (now, msg)
            self._heartbeats[("scheduler", msg.instance_id)] = now
            self.metrics.observe_scheduler_stats(msg)
        for instance, (seen, _) in list(self._stats.items()):
            if now - seen > self.config.health_timeout:
                del self._stats[instance]
                self.metrics.forget_scheduler(instance)

    def max_model_len(self, model_len: int) -> int:
        """The longest job (prompt + output) that every live worker's GPU KV
        pool can hold, and at most the model's context length."""
        live = self.alive("worker")
        return min([model_len, *(self._worker_limits[w] for w in live if w in self._worker_limits)])

    # ------------------------------------------------------------ health
    def alive(self, service: str) -> list[str]:
        now = time.monotonic()
        return sorted(i for (s, i), seen in self._heartbeats.items()
                      if s == service and now - seen < self.config.health_timeout)

    def health(self) -> tuple[bool, dict]:
        services = {s: self.alive(s) for s in ("scheduler", "worker", "kvstore")}
        ok = bool(services["scheduler"]) and bool(services["worker"])
        return ok, {"status": "ok" if ok else "unavailable", "gateway": self.config.instance_id,
                    "pending_requests": self._pending_requests, **services}
