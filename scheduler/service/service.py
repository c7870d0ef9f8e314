"""The scheduler service: an asyncio shell around `SchedulerCore`.

One per model replica. Bus handlers only append to an inbox and wake the
loop; the loop applies the inbox at an iteration boundary (state.py, nothing
awaits there), keeps up to `max_batches_in_flight` batches at the worker, and
hands everything it sends to ordered outboxes, so it never waits on the broker:

    loop: apply inbox -> check peers -> schedule + send while fewer than N in flight
          -> send token events -> wait for the next message

With two batches in flight the core plans iteration i+1 while the worker runs
i: the worker always has the next command queued, and the scheduler and the
bus are off the critical path (DESIGN.md, "The iteration loop").

Failures (DESIGN.md, "When something fails"): a worker that stops
heartbeating, whose queue vanished, or that lost a command or a result ends
the epoch: the core forgets the GPU KV and its jobs continue by recompute
when a worker is back (or fail after `worker_grace`). A KV store that goes
away takes only host copies with it (recompute). The loop never ends on a
bus error: the outboxes retry until the broker is back.

Beside this module: job_table.py (per-job state, the commands' deltas),
state.py (the synchronous state changes), peers.py (worker and KV store
liveness), config.py (config, `build_core`), loop_stats.py (timings, stats).
"""
from __future__ import annotations

import asyncio
import time
from collections import OrderedDict

import structlog

from fastserve.common import names
from fastserve.common.bus import Bus
from fastserve.common.lifecycle import ServiceTasks, send_heartbeats
from fastserve.common.outbox import Outbox
from fastserve.common.schemas import (
    BatchCommand, BatchResult, Heartbeat, JobCancel, JobSubmit, KVCopyDone, KVMoveOrder, KVPlan, Message,
    SchedulerStats, SchemaError, TokenBatch, TokenEvent, decode, peek,
)
from fastserve.scheduler.core.types import IterationResult
from fastserve.scheduler.service.config import SchedulerServiceConfig, build_core
from fastserve.scheduler.service.job_table import JobTable
from fastserve.scheduler.service.loop_stats import LoopTimes, snapshot_message, stats_message
from fastserve.scheduler.service.peers import Peers
from fastserve.scheduler.service.state import ServiceState

log = structlog.get_logger("fastserve.scheduler")


class SchedulerService:
    def __init__(self, config: SchedulerServiceConfig, bus: Bus):
        self.config = config
        self.bus = bus
        self.core = None
        self.jobs = JobTable(config.instance_id)
        self.state: ServiceState | None = None
        self.peers = Peers(config.replica, config.instance_id, config.worker_timeout, config.kvstore_timeout)
        self.times = LoopTimes()
        self.epoch = 0
        self._inbox: list[tuple[str, object]] = []
        self._deferred: list[tuple[str, object]] = []  # arrived before the core existed
        self._wake = asyncio.Event()
        self._core_ready = asyncio.Event()
        self._room = asyncio.Condition()  # admission: notified when jobs leave
        self._inflight: OrderedDict[int, tuple[object, float]] = OrderedDict()  # iteration -> (decision, sent)
        self._worker_missing_since: float | None = None
        self._tasks = ServiceTasks(log)
        self._outbox = Outbox(bus, self._send_failed)
        self._broadcast = Outbox(bus, self._send_failed, exchange=names.EVENTS_EXCHANGE)
        self._stopping = False

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        c = self.config
        bus = self.bus
        await bus.declare_exchange(names.EVENTS_EXCHANGE)
        await bus.declare_exchange(names.CONTROL_EXCHANGE)
        await bus.declare_exchange(names.KV_EXCHANGE)
        await bus.declare_queue(names.JOB_QUEUE, durable=True)
        await bus.declare_queue(names.scheduler_queue(c.replica), durable=False,
                                bindings=[(names.KV_EXCHANGE, names.kv_done_key(c.replica))])
        await bus.declare_queue(names.control_queue(c.instance_id), durable=False, exclusive=True,
                                auto_delete=True, bindings=[(names.CONTROL_EXCHANGE, names.CANCEL_KEY)])
        await bus.declare_queue(names.events_queue(c.instance_id), durable=False, exclusive=True, auto_delete=True,
                                bindings=[(names.EVENTS_EXCHANGE, f"{names.HEARTBEAT_KEY_PREFIX}.worker.#"),
                                          (names.EVENTS_EXCHANGE, f"{names.HEARTBEAT_KEY_PREFIX}.kvstore.#"),
                                          (names.EVENTS_EXCHANGE, names.heartbeat_key("scheduler", c.instance_id))])
        for queue, handler, prefetch in ((names.events_queue(c.instance_id), self._on_event, 64),
                                         (names.scheduler_queue(c.replica), self._on_reply, 256),
                                         (names.control_queue(c.instance_id), self._on_control, 256)):
            self._tasks.add_subscription(await bus.consume(queue, handler, prefetch=prefetch))
        self._tasks.spawn(send_heartbeats(bus, "scheduler", c.instance_id, c.heartbeat_interval, self._heartbeat,
                                          lambda: not self._stopping, log), "scheduler-heartbeat")
        self._tasks.spawn(self._guarded_loop(), "scheduler-loop")
        log.info("scheduler waiting for a worker", replica=c.replica)
        try:
            await asyncio.wait_for(self._core_ready.wait(), c.worker_wait)
        except asyncio.TimeoutError:
            await self._tasks.close()
            raise RuntimeError(f"no worker of replica {c.replica!r} sent a heartbeat "
                               f"within {c.worker_wait:.0f}s") from None
        if c.uses_host_kv and self.peers.kvstore is None:
            # Heartbeats come every interval: a KV store that runs is heard by then.
            # Without one, KV that does not fit is recomputed until one appears.
            deadline = time.monotonic() + 3 * c.heartbeat_interval
            while self.peers.kvstore is None and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            if self.peers.kvstore is None:
                log.warning("no KV store heard: KV that does not fit the GPU is recomputed until one joins")
        # The shared job queue last: a job is taken only when it can be served.
        self._tasks.add_subscription(await bus.consume(names.JOB_QUEUE, self._on_job, prefetch=max(
            1, min(c.max_queued_jobs or 64, 256))))
        log.info("scheduler started", replica=c.replica, policy=c.policy, kv_policy=c.kv_policy,
                 gpu_blocks=self.jobs.num_gpu_blocks, batches_in_flight=c.max_batches_in_flight)

    async def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        await self._outbox.drain(2.0)
        await self._tasks.close()
        await self._outbox.close()
        await self._broadcast.close()

    # ------------------------------------------------------------------ bus handlers (inbox only)
    async def _on_job(self, body: bytes, headers: dict) -> None:
        try:
            msg = decode(body, JobSubmit)
        except SchemaError as exc:
            # Dead-lettered by the bus; its sender, if it can be told, is told why.
            who = peek(body, "job_id", "reply_to")
            if len(who) == 2:
                self._outbox.send(who["reply_to"], TokenBatch(self.config.instance_id, [TokenEvent(
                    who["job_id"], [], error=f"malformed job: {exc}")]))
            raise
        # Admission: hold the message (and so the rest of the shared queue,
        # which other replicas may take) while this replica is full.
        limit = self.config.max_queued_jobs
        if limit:
            async with self._room:
                await self._room.wait_for(lambda: self._stopping or self._queued() < limit)
            if self._stopping:
                raise RuntimeError("scheduler stopping")  # back to the queue, for another replica
        self._push("submit", msg)

    def _queued(self) -> int:
        return self.jobs.num_unfinished() + sum(1 for kind, _ in self._inbox if kind == "submit")

    async def _on_control(self, body: bytes, headers: dict) -> None:
        self._push("cancel", decode(body, JobCancel))

    async def _on_reply(self, body: bytes, headers: dict) -> None:
        msg = decode(body, (BatchResult, KVCopyDone))
        self._push("result" if isinstance(msg, BatchResult) else "copy_done", msg)

    async def _on_event(self, body: bytes, headers: dict) -> None:
        self._push("heartbeat", decode(body, Heartbeat))

    def _push(self, kind: str, msg: object) -> None:
        self._inbox.append((kind, msg))
        self._wake.set()

    def _send_failed(self, key: str, msg: Message, exc: Exception) -> None:
        """An outbox found its destination queue gone (unroutable)."""
        self._push("unroutable", (key, msg))

    # ------------------------------------------------------------------ the loop
    async def _guarded_loop(self) -> None:
        while not self._stopping:
            try:
                await self._loop()
            except asyncio.CancelledError:
                raise
            except Exception:
                # A bug, not a bus error (those never reach here). Start the
                # worker over (its state may not match ours) and go on: the
                # jobs continue by recompute rather than hang.
                log.exception("scheduler loop failed; starting the worker over")
                if self.core is not None:
                    self._end_epoch("scheduler loop failure")
                await asyncio.sleep(0.1)

    async def _loop(self) -> None:
        c = self.config
        last_stats = last_snapshot = 0.0
        while not self._stopping:
            self._wake.clear()
            now = time.monotonic()
            self._apply_inbox(now)
            if self.core is None:
                await self._wait(1.0)
                continue
            self._check_peers(now)
            self._fill_pipeline(now)
            self._send_events()
            if not self._inflight and self.jobs.has_worker_free() and self.peers.worker is not None:
                self._send_to_worker(BatchCommand(replica=c.replica, epoch=self.epoch, iteration=-1,
                                                  free=self.jobs.take_worker_free(), scheduler_id=c.instance_id))
            if now - last_stats >= c.stats_interval:
                last_stats = now
                self._broadcast.send(names.stats_key(c.instance_id), self.stats_message())
            if c.snapshot_interval and now - last_snapshot >= c.snapshot_interval:
                last_snapshot = now
                self._send_snapshot()
            async with self._room:
                self._room.notify_all()
            await self._wait(self._next_check())

    async def _wait(self, timeout: float) -> None:
        if self._inbox:
            return
        try:
            await asyncio.wait_for(self._wake.wait(), timeout)
        except asyncio.TimeoutError:
            pass

    def _next_check(self) -> float:
        # Wake up for liveness checks, stats and snapshots even when nothing arrives.
        c = self.config
        return min(c.stats_interval, c.snapshot_interval or 1.0, c.worker_timeout / 4, 1.0)

    def _fill_pipeline(self, now: float) -> None:
        c = self.config
        worker = self.peers.worker
        limit = c.batches_in_flight(worker.worker) if worker is not None else 0
        while worker is not None and len(self._inflight) < limit:
            t0 = time.perf_counter()
            decision = self.core.schedule(now)
            self._send_plan(decision)
            if not decision.batch:
                # Nothing ran: settle the decision so the core does not keep it outstanding.
                self.core.update(IterationResult(decision.iteration, 0.0, []), now)
                return
            cmd = self.jobs.command(c.replica, self.epoch, decision)
            sent = time.perf_counter()
            self.times.schedule_seconds += sent - t0
            self._inflight[decision.iteration] = (decision, sent)
            self._send_to_worker(cmd)

    def _send_to_worker(self, cmd: BatchCommand) -> None:
        self._outbox.send(self.peers.worker.queue, cmd)

    def _send_plan(self, decision) -> None:
        kv = self.peers.kvstore
        free = self.jobs.take_kv_free()
        moves = [KVMoveOrder(m.move_id, m.job_id, m.direction, m.gpu_blocks)
                 for m in (*decision.offloads, *decision.uploads)]
        if kv is None or (not moves and not free):
            return  # without a KV store the core plans no moves (host capacity 0)
        for m in moves:
            self.jobs.mark_moved(m.job_id)
        self._outbox.send(kv.queue, KVPlan(replica=self.config.replica, worker_queue=self.peers.worker.queue,
                                           moves=moves, free=free, scheduler_id=self.config.instance_id))

    def _send_events(self) -> None:
        for reply_to, events in self.state.take_events().items():
            self._outbox.send(reply_to, TokenBatch(scheduler_id=self.config.instance_id, events=events))

    # ------------------------------------------------------------------ inbox
    def _apply_inbox(self, now: float) -> None:
        inbox, self._inbox = self._inbox, []
        for kind, msg in inbox:
            if kind == "heartbeat":
                self._heartbeat_seen(msg, now)
            elif self.core is None:
                self._deferred.append((kind, msg))  # kept until there is a worker to size the core
            elif kind == "submit":
                self.state.submit(msg, now)
            elif kind == "cancel":
                self.state.cancel(msg.job_id, reason=msg.reason or "cancelled")
            elif kind == "copy_done":
                self.state.copy_done(msg, now)
                if msg.timed_out and msg.direction == "upload":
                    # The copy may still write into GPU blocks the core now
                    # considers free: start the worker over (it waits for its copies).
                    self._end_epoch(f"upload of {msg.job_id} timed out")
            elif kind == "result":
                self._result(msg)
            elif kind == "unroutable":
                self._unroutable(*msg)

    def _result(self, result: BatchResult) -> None:
        if result.epoch != self.epoch or result.iteration not in self._inflight:
            log.info("stale batch result", iteration=result.iteration, epoch=result.epoch)
            return
        oldest = next(iter(self._inflight))
        if result.iteration != oldest:
            # One worker answers in order: the result of `oldest` was lost on the bus.
            self._end_epoch(f"the result of iteration {oldest} was lost")
            return
        if result.unknown_jobs:
            self._end_epoch(f"the worker does not hold {len(result.unknown_jobs)} of its jobs "
                            f"(a command was lost), e.g. {result.unknown_jobs[0]}")
            return
        decision, sent = self._inflight.pop(result.iteration)
        received = time.perf_counter()
        self.times.record(sent, received, result.step_seconds, tokens=len(result.tokens))
        self.state.apply_result(decision, result)
        self.times.schedule_seconds += time.perf_counter() - received

    def _unroutable(self, key: str, msg: Message) -> None:
        if isinstance(msg, BatchCommand):
            if self.peers.worker is not None and key == self.peers.worker.queue:
                self.peers.drop("worker")
                self._worker_gone("its queue is gone")
        elif isinstance(msg, KVPlan):
            if self.peers.kvstore is not None and key == self.peers.kvstore.queue:
                self.peers.drop("kvstore")
                self._kvstore_gone("its queue is gone")
        elif isinstance(msg, TokenBatch):
            self.state.gateway_gone(key)

    # ------------------------------------------------------------------ peers
    def _heartbeat_seen(self, hb: Heartbeat, now: float) -> None:
        old_worker = self.peers.worker
        for change in self.peers.heard(hb, now):
            if change == "worker_new" and self.core is None:
                self._first_worker(self.peers.worker)
            elif change == "worker_new":
                log.info("worker joined", worker=hb.instance_id)
                self._worker_missing_since = None
            elif change == "worker_replaced":
                log.warning("worker replaced", old=old_worker.instance_id, new=hb.instance_id)
                self._worker_gone(f"replaced by {hb.instance_id}")
                self._worker_missing_since = None
            elif change in ("kvstore_new", "kvstore_replaced"):
                if change == "kvstore_replaced":
                    self._kvstore_gone(f"replaced by {hb.instance_id}")
                log.info("KV store joined", kvstore=hb.instance_id, host_blocks=hb.pool.num_blocks)
                if self.core is not None and self.config.uses_host_kv:
                    self.core.set_host_capacity(hb.pool.num_blocks)

    def _first_worker(self, peer) -> None:
        self.core, num_gpu = build_core(self.config, peer.worker)
        self.jobs.set_worker(peer.worker, num_gpu)
        self.state = ServiceState(self.core, self.jobs, self.config.instance_id)
        if self.peers.kvstore is not None and self.config.uses_host_kv:
            self.core.set_host_capacity(self.peers.kvstore.pool.num_blocks)
        self._inbox[:0], self._deferred = self._deferred, []
        self._core_ready.set()

    def _check_peers(self, now: float) -> None:
        for loss in self.peers.check(now):
            if loss == "worker_lost":
                self._worker_gone(f"no heartbeat for {self.config.worker_timeout:g}s")
            else:
                self._kvstore_gone(f"no heartbeat for {self.config.kvstore_timeout:g}s")
        w = self.peers.worker
        if w is not None and self._inflight and self.peers.bus_healthy(now, settle=self.config.worker_timeout):
            # The worker is alive but a command or a result went missing (a broker restart loses
            # what it held): its heartbeat says it finished or never got what we still wait for.
            oldest, (_, sent) = next(iter(self._inflight.items()))
            waited = time.perf_counter() - sent
            c_timeout = self.config.worker_timeout
            if w.scheduler_id == self.config.instance_id and w.epoch == self.epoch and waited > c_timeout and (
                    w.completed >= oldest or w.received < oldest):
                self._end_epoch(f"iteration {oldest} was lost on the bus")
        if self.peers.worker is None and self.jobs.num_unfinished():
            since = self._worker_missing_since or now
            self._worker_missing_since = since
            if now - since > self.config.worker_grace:
                self.state.fail_all(f"no worker of replica {self.config.replica!r} for "
                                    f"{self.config.worker_grace:g}s")
                self._worker_missing_since = now
        self.state.expire(time.time())

    def _worker_gone(self, why: str) -> None:
        self._end_epoch(f"worker gone: {why}")
        self._worker_missing_since = time.monotonic()

    def _end_epoch(self, why: str) -> None:
        """Start over with the worker: what it holds is unknown or lost."""
        lost = self.core.lose_gpu_kv()
        self._inflight.clear()
        self.jobs.worker_lost()
        for job_id in lost:
            self.jobs.mark_moved(job_id)  # an offload in flight may have left a host copy
        self.epoch += 1
        log.warning("worker epoch ended", why=why, epoch=self.epoch, recompute=len(lost),
                    jobs=self.jobs.num_unfinished())

    def _kvstore_gone(self, why: str) -> None:
        lost = self.core.lose_host_kv()
        self.core.set_host_capacity(0)
        self.jobs.kvstore_lost()
        log.warning("KV store lost: host copies recomputed", why=why, recompute=len(lost))

    # ------------------------------------------------------------------ stats and liveness
    def stats_message(self) -> SchedulerStats:
        return stats_message(self.config, self.core, self.jobs, self.times)

    def _send_snapshot(self) -> None:
        key = names.snapshot_key(self.config.instance_id)
        if self._broadcast.pending(key):
            return  # the last one is not out yet (the broker is away): only the newest matters
        t0 = time.perf_counter()
        self._broadcast.send(key, snapshot_message(self.config, self.core, self.times))
        self.times.snapshots += 1
        self.times.snapshot_seconds += time.perf_counter() - t0

    def _heartbeat(self) -> dict:
        c = self.config
        return {"replica": c.replica, "info": {
            "model": c.served_model_name, "policy": c.policy, "kv_policy": c.kv_policy, "epoch": self.epoch,
            "loop": self.times.summary(), "jobs": self.jobs.num_unfinished(),
            "worker": self.peers.worker.instance_id if self.peers.worker else None,
            "kvstore": self.peers.kvstore.instance_id if self.peers.kvstore else None}}


__all__ = ["SchedulerService", "SchedulerServiceConfig", "JobTable", "build_core"]
