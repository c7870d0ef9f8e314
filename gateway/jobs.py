"""The gateway's side of the bus: submit jobs, route their token events back,
cancel them, and watch heartbeats and scheduler stats (health, admission,
metrics).

The gateway owns every request it accepted until it ends (DESIGN.md, "When
something fails"). Each job remembers the tokens it streamed and which
scheduler holds it. When that scheduler stops heartbeating (while the bus
itself works), the job is submitted again as a continuation: a new attempt
id, the prompt followed by the tokens already streamed, the same sampling
(seeded draws depend on the position, so it continues with the very tokens
it would have drawn). The first scheduler to announce an attempt holds the
job; events of any other attempt are dropped and that attempt is cancelled.
Events are deduplicated by their token counts (a retried publish may arrive
twice); a gap is an error, never silently wrong text.
"""
from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

import structlog

from fastserve.common import names
from fastserve.common.bus import Bus, Subscription
from fastserve.common.metrics import Metrics
from fastserve.common.sampling_params import SamplingParams
from fastserve.common.schemas import (
    PRIORITY_INTERACTIVE, Heartbeat, JobCancel, JobSubmit, SchedulerStats, TokenBatch, TokenEvent, decode, encode,
)
from fastserve.gateway.config import GatewayConfig
from fastserve.gateway.protocol import APIError

log = structlog.get_logger("fastserve.gateway")


@dataclass
class JobState:
    """One choice of a request, across the attempts it took."""

    job_id: str
    index: int
    prompt: list[int]
    sampling: SamplingParams
    attempt: str  # the attempt id whose events count
    attempts: int = 1
    scheduler: str | None = None  # who announced the current attempt
    received: list[int] = field(default_factory=list)
    finished: bool = False


@dataclass
class Submission:
    """The jobs of one HTTP request; their events arrive on one queue as (choice index, event)."""

    trace_id: str
    job_ids: list[str]
    deadline: float  # time.time()
    priority: int = PRIORITY_INTERACTIVE
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    finished: set[str] = field(default_factory=set)


class JobTracker:
    def __init__(self, config: GatewayConfig, bus: Bus, metrics: Metrics) -> None:
        self.config = config
        self.bus = bus
        self.metrics = metrics
        self.reply_queue = names.reply_queue(config.instance_id)
        self._routes: dict[str, tuple[Submission, JobState]] = {}  # attempt id -> its job
        self._jobs: dict[str, tuple[Submission, JobState]] = {}  # job id -> state
        self._pending_requests = 0
        self._heartbeats: dict[tuple[str, str], float] = {}  # (service, instance) -> last seen (monotonic)
        self._worker_limits: dict[str, int] = {}  # worker instance -> longest job its GPU KV pool holds
        self._stats: dict[str, tuple[float, SchedulerStats]] = {}
        self._cancels: asyncio.Queue[JobCancel] = asyncio.Queue()
        self._resubmits: asyncio.Queue = asyncio.Queue()
        self._subs: list[Subscription] = []
        self._started = time.monotonic()
        self._bus_seen: float | None = None  # our own heartbeat came back: the bus works
        self.resubmitted = 0

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
        for attempt, (sub, _) in list(self._routes.items()):  # jobs still running when the gateway goes away
            self._cancels.put_nowait(JobCancel(attempt, sub.trace_id, "gateway shutdown"))
        await self._send_cancels(drain=True)

    async def run_cancel_sender(self) -> None:
        """Background task: publishes cancels queued by `release` (handlers may be
        unwinding from a cancellation and must not await the broker themselves)."""
        await self._send_cancels(drain=False)

    async def run_heartbeat(self) -> None:
        """Background task: tell the deployment this gateway is alive."""
        while True:
            hb = Heartbeat("gateway", self.config.instance_id, time.time(), info={
                "model": self.config.served_model_name, "pending_requests": self._pending_requests})
            try:
                await self.bus.publish(names.heartbeat_key("gateway", self.config.instance_id), encode(hb),
                                       exchange=names.EVENTS_EXCHANGE)
            except Exception:  # noqa: BLE001 - a broker hiccup must not end the heartbeat
                log.warning("gateway.heartbeat_failed", exc_info=True)
            await asyncio.sleep(self.config.health_timeout / 5)

    async def run_watchdog(self) -> None:
        """Background task: continue the jobs of schedulers that died."""
        while True:
            await asyncio.sleep(self.config.health_timeout / 5)
            self.resubmit_orphans()

    async def _send_cancels(self, drain: bool) -> None:
        while not (drain and self._cancels.empty()):
            msg = await self._cancels.get()
            delay = 0.05
            while True:
                try:
                    await self.bus.publish(names.CANCEL_KEY, encode(msg), exchange=names.CONTROL_EXCHANGE)
                    log.debug("job.cancel_sent", job_id=msg.job_id, trace_id=msg.trace_id, reason=msg.reason)
                    break
                except Exception:  # noqa: BLE001 - the broker is away: keep it until it is back
                    if drain:
                        log.warning("job.cancel_failed", job_id=msg.job_id, trace_id=msg.trace_id)
                        break
                    await asyncio.sleep(delay)
                    delay = min(2 * delay, 2.0)

    # ------------------------------------------------------------ admission
    def admit(self, num_jobs: int) -> None:
        """Raise APIError 429/503 when this request should not be queued."""
        if self._pending_requests >= self.config.max_pending_requests:
            raise APIError(429, f"Too many requests in flight at this gateway (limit "
                                f"{self.config.max_pending_requests}); retry later.", "rate_limit_error",
                           None, "rate_limit_exceeded")
        grace = time.monotonic() - self._started < self.config.health_timeout
        if self.config.require_backend and not grace:
            if not self.bus_healthy():
                raise APIError(503, "The message broker is unreachable; the service is unavailable. Retry later.",
                               "service_unavailable", None, "service_unavailable")
            # A scheduler that restarts is back within the health timeout (jobs
            # sent meanwhile wait in the job queue); none for longer: refuse.
            if not self.alive("scheduler"):
                raise APIError(503, f"No scheduler is alive (no heartbeat in the last "
                                    f"{self.config.health_timeout:g}s); the service is unavailable.",
                               "service_unavailable", None, "service_unavailable")
        live = self._live_stats()
        if live and all(s.max_queued_jobs and s.num_waiting + num_jobs > s.max_queued_jobs for s in live):
            waiting = sum(s.num_waiting for s in live)
            raise APIError(503, f"The job queue is full ({waiting} jobs waiting, limit "
                                f"{live[0].max_queued_jobs} per scheduler); retry later.",
                           "service_unavailable", None, "queue_full")

    def bus_healthy(self) -> bool:
        return self._bus_seen is not None and time.monotonic() - self._bus_seen < self.config.health_timeout / 2

    def _live_stats(self) -> list[SchedulerStats]:
        now = time.monotonic()
        return [s for seen, s in self._stats.values() if now - seen < self.config.health_timeout]

    # ------------------------------------------------------------ jobs
    async def submit(self, trace_id: str, jobs: Iterable[tuple[str, list[int], SamplingParams]], *,
                     priority: int = PRIORITY_INTERACTIVE, deadline: float | None = None) -> Submission:
        """Publish one JobSubmit per (job_id, prompt ids, sampling). Jobs wait in
        the durable job queue while no scheduler takes them (up to the deadline:
        time.time(), by default request_timeout from now)."""
        jobs = list(jobs)
        deadline = time.time() + self.config.request_timeout if deadline is None else deadline
        sub = Submission(trace_id, [j for j, _, _ in jobs], deadline, priority)
        self._pending_requests += 1
        try:
            for index, (job_id, prompt, sampling) in enumerate(jobs):
                state = JobState(job_id, index, prompt, sampling, attempt=job_id)
                self._routes[job_id] = (sub, state)
                self._jobs[job_id] = (sub, state)
                await self._publish_job(sub, state, job_id, prompt, 0)
        except BaseException as exc:
            self.release(sub, reason="submit failed")
            if isinstance(exc, Exception) and not isinstance(exc, APIError):
                log.warning("job.submit_failed", trace_id=trace_id, error=f"{type(exc).__name__}: {exc}")
                raise APIError(503, "The message broker did not take the request; the service is unavailable. "
                                    "Retry later.", "service_unavailable", None, "service_unavailable") from exc
            raise
        return sub

    async def _publish_job(self, sub: Submission, state: JobState, attempt: str, prompt: list[int],
                           num_generated: int) -> None:
        msg = JobSubmit(job_id=attempt, trace_id=sub.trace_id, reply_to=self.reply_queue, prompt_token_ids=prompt,
                        sampling=state.sampling, arrival_time=time.time(), model=self.config.served_model_name,
                        num_generated=num_generated, deadline=sub.deadline, priority=sub.priority)
        await self.bus.publish(names.JOB_QUEUE, encode(msg), {"trace_id": sub.trace_id}, persistent=True)

    def release(self, sub: Submission, reason: str = "client disconnected") -> None:
        """Forget a request's jobs; cancel those not finished yet. Synchronous on purpose."""
        self._pending_requests -= 1
        for job_id in sub.job_ids:
            routed = self._jobs.pop(job_id, None)
            if routed is None:
                continue
            state = routed[1]
            self._routes.pop(state.attempt, None)
            if job_id not in sub.finished:
                self._cancels.put_nowait(JobCancel(state.attempt, sub.trace_id, reason))

    def release_job(self, sub: Submission, job_id: str, reason: str) -> None:
        """Cancel one job of a request now (a stop string matched) and ignore its later events."""
        if job_id not in sub.finished:
            sub.finished.add(job_id)
            routed = self._jobs.get(job_id)
            if routed is not None:
                self._routes.pop(routed[1].attempt, None)
                self._cancels.put_nowait(JobCancel(routed[1].attempt, sub.trace_id, reason))

    def mark_finished(self, sub: Submission, job_id: str) -> None:
        sub.finished.add(job_id)
        routed = self._jobs.get(job_id)
        if routed is not None:
            routed[1].finished = True

    async def _on_reply(self, body: bytes, headers: dict) -> None:
        batch = decode(body, TokenBatch)
        for ev in batch.events:
            self._route(batch.scheduler_id, ev)

    def _route(self, scheduler_id: str, ev: TokenEvent) -> None:
        routed = self._routes.get(ev.job_id)
        if routed is None:
            log.debug("job.event_for_unknown_job", job_id=ev.job_id)
            return
        sub, state = routed
        if state.scheduler is None:
            state.scheduler = scheduler_id
        elif state.scheduler != scheduler_id:
            # Two schedulers run the same attempt (the job queue redelivered it):
            # the first keeps it.
            return
        # Deduplicate: the event covers generated tokens [start, ev.num_generated).
        start = ev.num_generated - len(ev.token_ids)
        have = len(state.received)
        if ev.token_ids and start != have:
            if start + len(ev.token_ids) <= have:
                return  # a duplicate of tokens already streamed
            if start < have:
                ev = _tail(ev, have - start)
            else:
                ev = TokenEvent(job_id=ev.job_id, token_ids=[], error=(
                    f"internal error: tokens {have}..{start - 1} of the output were lost"))
        if not ev.token_ids and not ev.finished:
            return  # the announcement: it only says who holds the job
        state.received.extend(ev.token_ids)
        sub.events.put_nowait((state.index, ev))

    # ------------------------------------------------------------ continuation
    def resubmit_orphans(self) -> None:
        """Jobs whose scheduler died (while the bus works), and jobs nobody has
        announced yet (that scheduler may have taken them): submit them again
        as continuations; cancel the old attempts in case it lives after all."""
        if not self.bus_healthy():
            return  # everyone looks silent while the broker is away: judge nobody
        alive = set(self.alive("scheduler"))
        dead = {s for (kind, s) in self._heartbeats if kind == "scheduler"} - alive
        if not dead:
            return
        log.warning("scheduler.gone", schedulers=sorted(dead))
        for job_id, (sub, state) in list(self._jobs.items()):
            if state.finished or job_id in sub.finished:
                continue
            if state.scheduler in dead or state.scheduler is None:
                self._continue(sub, state)
        for s in dead:  # judged once: a scheduler that comes back heartbeats anew
            self._heartbeats.pop(("scheduler", s), None)

    def _continue(self, sub: Submission, state: JobState) -> None:
        old = state.attempt
        if len(state.received) >= state.sampling.max_tokens:
            return
        state.attempts += 1
        state.attempt = f"{state.job_id}~{state.attempts}"
        state.scheduler = None
        self._routes.pop(old, None)
        self._routes[state.attempt] = (sub, state)
        self._cancels.put_nowait(JobCancel(old, sub.trace_id, "continued elsewhere"))
        self.resubmitted += 1
        log.warning("job.continued", job_id=state.job_id, trace_id=sub.trace_id, attempt=state.attempt,
                    streamed=len(state.received))
        prompt = state.prompt + state.received
        self._resubmits.put_nowait((sub, state, state.attempt, prompt, len(state.received)))

    async def run_resubmitter(self) -> None:
        """Background task: publishes continuations, retrying while the
        broker is away (a continuation must not be lost: nobody else has the job)."""
        while True:
            sub, state, attempt, prompt, n = await self._resubmits.get()
            delay = 0.05
            while state.attempt == attempt and not state.finished and state.job_id in self._jobs:
                try:
                    await self._publish_job(sub, state, attempt, prompt, n)
                    break
                except Exception as exc:  # noqa: BLE001 - retried until the bus is back or the request ends
                    log.warning("job.continue_retry", job_id=state.job_id, error=f"{type(exc).__name__}: {exc}")
                    await asyncio.sleep(delay)
                    delay = min(2 * delay, 2.0)

    # ------------------------------------------------------------ events
    async def _on_event(self, body: bytes, headers: dict) -> None:
        msg = decode(body, (Heartbeat, SchedulerStats))
        now = time.monotonic()
        if isinstance(msg, Heartbeat):
            if msg.service == "gateway" and msg.instance_id == self.config.instance_id:
                self._bus_seen = now
            self._heartbeats[(msg.service, msg.instance_id)] = now
            if msg.service == "worker" and msg.worker is not None:
                w = msg.worker
                self._worker_limits[msg.instance_id] = min(w.max_model_len, w.num_gpu_blocks * w.block_size)
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
        ok = bool(services["scheduler"]) and bool(services["worker"]) and self.bus_healthy()
        return ok, {"status": "ok" if ok else "unavailable", "gateway": self.config.instance_id,
                    "bus": "ok" if self.bus_healthy() else "unreachable",
                    "pending_requests": self._pending_requests, **services}


def _tail(ev: TokenEvent, skip: int) -> TokenEvent:
    return TokenEvent(job_id=ev.job_id, token_ids=ev.token_ids[skip:],
                      logprobs=ev.logprobs[skip:] if ev.logprobs else ev.logprobs,
                      top_logprobs=ev.top_logprobs[skip:] if ev.top_logprobs else ev.top_logprobs,
                      finish_reason=ev.finish_reason, error=ev.error, num_prompt_tokens=ev.num_prompt_tokens,
                      num_generated=ev.num_generated, queue_time=ev.queue_time)
