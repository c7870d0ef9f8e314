"""The scheduler service: an asyncio shell around `SchedulerCore`.

One per model replica. Every state change happens synchronously at an
iteration boundary: bus handlers only append to an inbox, and the loop applies
the inbox, calls `core.schedule()`, sends one `BatchCommand` to the worker,
waits for its `BatchResult`, decides which jobs finished and calls
`core.update()`. The token events of iteration i are published together with
the command of iteration i+1, so they travel while the worker computes.
`pipeline_depth` > 1 keeps several batches in flight (the core leaves jobs of
outstanding batches out of new ones).

Beside this module: job_table.py (per-job state, the commands' deltas),
state.py (the synchronous state changes), config.py (config, `build_core`),
loop_stats.py (loop timings, `SchedulerStats`).
"""
from __future__ import annotations

import asyncio
import time
from collections import OrderedDict

import structlog

from fastserve.common import names
from fastserve.common.bus import Bus, UnroutableError
from fastserve.common.lifecycle import ServiceTasks, send_heartbeats
from fastserve.common.schemas import (
    BatchCommand, BatchResult, Heartbeat, JobCancel, JobSubmit, KVCopyDone, KVPlan, SchedulerStats, TokenEvent,
    decode, encode,
)
from fastserve.scheduler.service.job_table import JobTable, WorkerInfo
from fastserve.scheduler.service.loop_stats import LoopTimes, stats_message
from fastserve.scheduler.service.config import SchedulerServiceConfig, build_core
from fastserve.scheduler.service.state import ServiceState
from fastserve.scheduler.core.types import IterationResult

log = structlog.get_logger("fastserve.scheduler")


class SchedulerService:
    def __init__(self, config: SchedulerServiceConfig, bus: Bus):
        self.config = config
        self.bus = bus
        self.core = None
        self.jobs: JobTable | None = None
        self.state: ServiceState | None = None  # applies the inbox and the results
        self.worker: WorkerInfo | None = None
        self.times = LoopTimes()
        self._worker_seen = asyncio.Event()
        self._wake = asyncio.Event()
        self._inbox: list[tuple[str, object]] = []
        self._expect: dict[int, asyncio.Future] = {}  # iteration -> its result, while in flight
        self._tasks = ServiceTasks(log)
        self._stopping = False
        self.failed: BaseException | None = None

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        c = self.config
        bus = self.bus
        await bus.declare_exchange(names.EVENTS_EXCHANGE)
        await bus.declare_exchange(names.CONTROL_EXCHANGE)
        await bus.declare_queue(names.JOB_QUEUE, durable=True)
        await bus.declare_queue(names.scheduler_queue(c.replica), durable=False)
        await bus.declare_queue(names.worker_queue(c.replica), durable=False)
        await bus.declare_queue(names.control_queue(c.instance_id), durable=False, exclusive=True,
                                auto_delete=True, bindings=[(names.CONTROL_EXCHANGE, names.CANCEL_KEY)])
        await bus.declare_queue(names.events_queue(c.instance_id), durable=False, exclusive=True,
                                auto_delete=True,
                                bindings=[(names.EVENTS_EXCHANGE, f"{names.HEARTBEAT_KEY_PREFIX}.worker.#")])
        for queue, handler, prefetch in ((names.events_queue(c.instance_id), self._on_event, 16),
                                         (names.scheduler_queue(c.replica), self._on_reply, 64),
                                         (names.control_queue(c.instance_id), self._on_control, 64)):
            self._tasks.add_subscription(await bus.consume(queue, handler, prefetch=prefetch))
        log.info("scheduler waiting for a worker", replica=c.replica)
        try:
            await asyncio.wait_for(self._worker_seen.wait(), c.worker_wait)
        except asyncio.TimeoutError:
            raise RuntimeError(f"no worker of replica {c.replica!r} sent a heartbeat "
                               f"within {c.worker_wait:.0f}s") from None
        self.core, num_gpu = build_core(c, self.worker)
        self.jobs = JobTable(self.worker, num_gpu, c.instance_id)
        self.state = ServiceState(self.core, self.jobs, c.instance_id)
        # The shared job queue last: a job is taken only when it can be served.
        self._tasks.add_subscription(await bus.consume(names.JOB_QUEUE, self._on_job, prefetch=1))
        self._tasks.spawn(self._guarded_loop(), "scheduler-loop")
        # Also stops when the loop crashes: gateways then report this scheduler gone.
        self._tasks.spawn(send_heartbeats(bus, "scheduler", c.instance_id, c.heartbeat_interval, self._heartbeat_info,
                                          lambda: not self._stopping, log), "scheduler-heartbeat")
        log.info("scheduler started", replica=c.replica, policy=c.policy, kv_policy=c.kv_policy,
                 gpu_blocks=num_gpu, host_blocks=c.host_kv_blocks)

    async def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        await self._tasks.close()

    # ------------------------------------------------------------------ bus handlers (inbox only)
    async def _on_job(self, body: bytes, headers: dict) -> None:
        msg = decode(body, JobSubmit)
        # Admission: hold the message (and so the rest of the shared queue,
        # which other replicas may take) while this replica is full.
        limit = self.config.max_queued_jobs
        while limit and self.jobs is not None and self.jobs.num_unfinished() + len(self._inbox) >= limit:
            if self._stopping:
                raise RuntimeError("scheduler stopping")  # redelivered to another replica
            await asyncio.sleep(0.01)
        self._push("submit", msg)

    async def _on_control(self, body: bytes, headers: dict) -> None:
        self._push("cancel", decode(body, JobCancel))

    async def _on_reply(self, body: bytes, headers: dict) -> None:
        msg = decode(body, (BatchResult, KVCopyDone))
        if isinstance(msg, BatchResult):
            fut = self._expect.get(msg.iteration)
            if fut is not None and not fut.done():
                fut.set_result(msg)
            else:
                log.warning("stale batch result", iteration=msg.iteration)
        else:
            self._push("copy_done", msg)

    async def _on_event(self, body: bytes, headers: dict) -> None:
        msg = decode(body, Heartbeat)
        if msg.service == "worker" and msg.info.get("replica") == self.config.replica:
            if self.worker is None:
                self.worker = WorkerInfo.from_info(msg.info)
                self._worker_seen.set()
            self.worker.last_seen = time.monotonic()

    def _push(self, kind: str, msg: object) -> None:
        self._inbox.append((kind, msg))
        self._wake.set()

    # ------------------------------------------------------------------ the loop
    async def _guarded_loop(self) -> None:
        try:
            await self._loop()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            # A scheduler whose state may be inconsistent must not go on
            # serving; stopping its heartbeat makes gateways report it gone.
            log.exception("scheduler loop crashed")
            self.failed = exc
            self._stopping = True

    async def _loop(self) -> None:
        depth = self.config.pipeline_depth
        inflight: OrderedDict[int, tuple[object, asyncio.Future, float]] = OrderedDict()
        pending: list[tuple[str, TokenEvent]] = []
        last_received: float | None = None  # None after an idle wait: the next gap is not back-to-back
        last_stats = 0.0
        while not self._stopping:
            sent_now = False
            if len(inflight) < depth:
                now = time.monotonic()
                inbox, self._inbox = self._inbox, []
                self.state.apply_inbox(inbox, now)
                decision = self.core.schedule(now)
                await self._send_plan(decision)
                if decision.batch:
                    cmd = self.jobs.command(self.config.replica, decision)
                    fut = asyncio.get_running_loop().create_future()
                    self._expect[decision.iteration] = fut
                    inflight[decision.iteration] = (decision, fut, time.perf_counter())
                    # Hidden work: the tokens of the iteration just applied go
                    # out while this one runs (their confirms overlap the command's).
                    await asyncio.gather(self._publish(names.worker_queue(self.config.replica), cmd),
                                         self._flush(pending))
                    pending = []
                    sent_now = True
                else:
                    # Nothing ran: settle the decision so the core does not keep it outstanding.
                    self.core.update(IterationResult(decision.iteration, 0.0, []), now)
            pending = await self._flush(pending)
            if time.monotonic() - last_stats >= self.config.stats_interval:
                last_stats = time.monotonic()
                await self._publish_stats()
            if sent_now and len(inflight) < depth:
                continue  # fill the pipeline before waiting
            if not inflight:
                last_received = None
                await self._idle()
                continue
            iteration, (decision, fut, sent) = next(iter(inflight.items()))
            result = await self._wait_result(iteration, fut, sent)
            del inflight[iteration]
            self._expect.pop(iteration, None)
            received = time.perf_counter()
            self.times.record(sent, received, last_received, result.step_seconds)
            last_received = received
            pending = self.state.apply_result(decision, result) + pending
        await self._flush(pending)

    async def _wait_result(self, iteration: int, fut: asyncio.Future, sent: float) -> BatchResult:
        """The batch's result, or a failed one when the worker stops
        heartbeating (it died) or the result is overdue."""
        c = self.config
        while True:
            try:
                return await asyncio.wait_for(asyncio.shield(fut), 1.0)
            except asyncio.TimeoutError:
                pass
            silent = time.monotonic() - self.worker.last_seen
            if silent > c.worker_timeout:
                error = f"the worker sent no heartbeat for {silent:.0f}s (gone?)"
            elif time.perf_counter() - sent > c.result_timeout:
                error = f"no result from the worker within {c.result_timeout:.0f}s"
            else:
                continue
            log.error("batch lost", iteration=iteration, error=error)
            return BatchResult(replica=c.replica, iteration=iteration, error=error)

    async def _idle(self) -> None:
        if self.jobs.has_worker_free():
            await self._publish(names.worker_queue(self.config.replica),
                                BatchCommand(replica=self.config.replica, iteration=-1,
                                             free=self.jobs.take_worker_free()))
        self._wake.clear()
        if not self._inbox:
            # Idle, or waiting on copies: a copy report or a job wakes us.
            timeout = 0.005 if self.jobs.num_unfinished() else 1.0
            try:
                await asyncio.wait_for(self._wake.wait(), timeout)
            except asyncio.TimeoutError:
                pass

    async def _send_plan(self, decision) -> None:
        if not self.config.host_kv_blocks:
            return
        moves = [[m.job_id, m.direction, list(m.src_blocks), list(m.dst_blocks)]
                 for m in (*decision.offloads, *decision.uploads)]
        free = self.jobs.take_kv_free()
        if not moves and not free:
            return
        for m in moves:
            self.jobs.mark_moved(m[0])
        await self._publish(names.kvstore_queue(self.config.replica),
                            KVPlan(replica=self.config.replica, iteration=decision.iteration, moves=moves, free=free))

    async def _flush(self, pending: list[tuple[str, TokenEvent]]) -> list:
        # One job's events in order; different jobs concurrently, so that
        # RabbitMQ's publisher confirms overlap instead of adding up.
        by_job: dict[str, list[tuple[str, TokenEvent]]] = {}
        for reply_to, event in self.state.take_events() + pending:
            by_job.setdefault(event.job_id, []).append((reply_to, event))
        if by_job:
            await asyncio.gather(*(self._publish_events(evs) for evs in by_job.values()))
        return []

    async def _publish_events(self, events: list[tuple[str, TokenEvent]]) -> None:
        for reply_to, event in events:
            try:
                await self._publish(reply_to, event)
            except UnroutableError:
                # The owning gateway is gone: nobody will read this job's tokens.
                log.warning("reply queue gone, cancelling", job_id=event.job_id, trace_id=event.trace_id)
                if not event.finished:
                    self._push("cancel", JobCancel(job_id=event.job_id, trace_id=event.trace_id,
                                                   reason="reply queue gone"))
                return

    async def _publish(self, key: str, msg, *, exchange: str = "") -> None:
        await self.bus.publish(key, encode(msg), exchange=exchange)

    # ------------------------------------------------------------------ stats and liveness
    def stats_message(self) -> SchedulerStats:
        return stats_message(self.config, self.core, self.jobs.num_gpu_blocks)

    async def _publish_stats(self) -> None:
        await self._publish(names.stats_key(self.config.instance_id), self.stats_message(),
                            exchange=names.EVENTS_EXCHANGE)

    def _heartbeat_info(self) -> dict:
        c = self.config
        return {"replica": c.replica, "model": c.model, "policy": c.policy, "kv_policy": c.kv_policy,
                "loop": self.times.summary(), "jobs": self.jobs.num_unfinished()}


__all__ = ["SchedulerService", "SchedulerServiceConfig", "JobTable", "WorkerInfo", "build_core"]
