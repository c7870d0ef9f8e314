"""The KV-store service: owns one replica's host KV pool on this node.

It creates the shared-memory pool that the replica's workers map (a new file
per instance: common/host_pool.py), assigns host blocks to the moves the
scheduler's placement policy chooses, schedules the copies on the link (at
most `max_copies_in_flight` per direction, uploads in the order the
scheduler wants them) and sends each one to the worker as a `KVCopy`. The
worker reports the end of each copy once, on the KV exchange, where this
service and the scheduler both hear it: a move costs two messages. No block
ever travels on the bus.

A copy that does not finish within `copy_timeout` is reported failed on the
worker's behalf (the scheduler keeps the KV on the GPU, or recomputes).
"""
from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass

import structlog

from fastserve.common import names
from fastserve.common import settings as S
from fastserve.common.bus import Bus
from fastserve.common.host_pool import HostKVPool, kv_bytes_per_block, pool_path, remove_stale_pools
from fastserve.common.lifecycle import ServiceTasks, send_heartbeats
from fastserve.common.outbox import Outbox
from fastserve.common.schemas import KVCopy, KVCopyDone, KVPlan, PoolSpec, decode
from fastserve.kvstore.host_table import HostTable, Move

log = structlog.get_logger("fastserve.kvstore")


@dataclass
class KVStoreServiceConfig:
    model: str = S.MODEL()  # the block size in bytes comes from its config.json
    replica: str = S.REPLICA()
    namespace: str = S.NAMESPACE()
    instance_id: str = S.INSTANCE_ID()
    block_size: int = S.BLOCK_SIZE()
    dtype: str = S.DTYPE()
    host_kv_blocks: int = S.HOST_KV_BLOCKS()
    host_kv_dir: str | None = S.HOST_KV_DIR()
    tensor_parallel_size: int = S.TENSOR_PARALLEL_SIZE()  # every rank keeps its chunk of each host block
    max_copies_in_flight: int = S.MAX_COPIES_IN_FLIGHT()
    copy_timeout: float = S.COPY_TIMEOUT()
    heartbeat_interval: float = S.HEARTBEAT_INTERVAL()

    def __post_init__(self) -> None:
        if not self.model:
            raise ValueError("model is required")
        if not self.instance_id:
            self.instance_id = f"kvstore-{self.replica}-{uuid.uuid4().hex[:6]}"
        S.validate(self)


class KVStoreService:
    def __init__(self, config: KVStoreServiceConfig, bus: Bus):
        self.config = config
        self.bus = bus
        self.pool: HostKVPool | None = None
        self.table = HostTable(config.host_kv_blocks, config.max_copies_in_flight)
        self.queue = names.kvstore_queue(config.replica, config.instance_id)
        self._worker_queue: str | None = None
        self._scheduler_id: str | None = None
        self._tasks = ServiceTasks(log)
        self._copies = Outbox(bus, self._unroutable)
        self._reports = Outbox(bus, self._unroutable, exchange=names.KV_EXCHANGE)
        self._wake = asyncio.Event()
        self._stopping = False
        self.stats = {"offloads": 0, "uploads": 0, "failed": 0, "blocks_moved": 0, "copy_seconds": 0.0}

    async def start(self) -> None:
        c = self.config
        bpb = kv_bytes_per_block(c.model, c.block_size, c.dtype, c.tensor_parallel_size)
        stale = await asyncio.to_thread(remove_stale_pools, c.host_kv_dir)
        if stale:
            log.info("removed stale host pools", files=[str(p) for p in stale])
        spec = PoolSpec(str(pool_path(c.namespace, c.replica, c.instance_id, c.host_kv_dir)), c.host_kv_blocks, bpb)
        self.pool = await asyncio.to_thread(HostKVPool.create, spec)
        await self.bus.declare_exchange(names.EVENTS_EXCHANGE)
        await self.bus.declare_exchange(names.KV_EXCHANGE)
        await self.bus.declare_queue(self.queue, durable=False, exclusive=True, auto_delete=True,
                                     bindings=[(names.KV_EXCHANGE, names.kv_done_key(c.replica))])
        self._tasks.add_subscription(await self.bus.consume(self.queue, self._on_message, prefetch=256))
        self._tasks.spawn(send_heartbeats(self.bus, "kvstore", c.instance_id, c.heartbeat_interval, self._heartbeat,
                                          lambda: not self._stopping, log), "kvstore-heartbeat")
        self._tasks.spawn(self._watch_deadlines(), "kvstore-deadlines")
        log.info("kvstore started", replica=c.replica, pool=spec.path, host_blocks=spec.num_blocks,
                 bytes_per_block=bpb, pool_mib=round(spec.nbytes / 2**20, 1))

    async def stop(self) -> None:
        self._stopping = True
        await self._tasks.close()
        await self._copies.close()
        await self._reports.close()
        if self.pool is not None:
            self.pool.close()

    def _heartbeat(self) -> dict:
        t = self.table
        return {"replica": self.config.replica, "queue": self.queue, "pool": self.pool.spec,
                "info": {"host_blocks_used": t.blocks_used, "jobs_on_host": t.jobs_on_host(),
                         "copies_in_flight": len(t.in_flight), **self.stats}}

    def _unroutable(self, key: str, msg, exc: Exception) -> None:
        # The worker's queue is gone (it died): its copies never run. Report
        # them failed so the scheduler does not wait (it also sees the worker go).
        if isinstance(msg, KVCopy) and key == self._worker_queue:
            for m in list(self.table.in_flight.values()):
                self._finish(m.move_id, f"worker queue {key} is gone")

    # ------------------------------------------------------------------ messages
    async def _on_message(self, body: bytes, headers: dict) -> None:
        msg = decode(body, (KVPlan, KVCopyDone))
        if isinstance(msg, KVPlan):
            self._plan(msg)
        elif msg.replica == self.config.replica:
            self._done(msg)

    def _plan(self, plan: KVPlan) -> None:
        if plan.scheduler_id != self._scheduler_id:
            if self._scheduler_id is not None:
                # The scheduler that placed these copies is gone (the new one
                # recomputes its jobs): the whole pool is free again.
                log.warning("new scheduler: host copies of the old one dropped", old=self._scheduler_id,
                            new=plan.scheduler_id, jobs=self.table.jobs_on_host())
                self.table = HostTable(self.config.host_kv_blocks, self.config.max_copies_in_flight)
            self._scheduler_id = plan.scheduler_id
        self._worker_queue = plan.worker_queue
        for job_id in plan.free:
            self.table.free(job_id)
        duplicates = self.table.duplicates
        refused = self.table.add_plan([Move(o.move_id, o.job_id, o.direction, list(o.gpu_blocks))
                                       for o in plan.moves])
        if self.table.duplicates > duplicates:
            log.warning("duplicate KV moves dropped (a plan published twice)",
                        moves=self.table.duplicates - duplicates)
        for move, problem in refused:
            log.warning("KV move refused", job_id=move.job_id, direction=move.direction, error=problem)
            self._report(move, problem)
        self._start_copies()

    def _start_copies(self) -> None:
        started, refused = self.table.start(time.monotonic())
        for move, problem in refused:
            log.warning("KV move refused", job_id=move.job_id, direction=move.direction, error=problem)
            self._report(move, problem)
        for m in started:
            log.debug("kv move", job_id=m.job_id, direction=m.direction, blocks=len(m.gpu_blocks))
            self._copies.send(self._worker_queue, KVCopy(
                replica=self.config.replica, move_id=m.move_id, job_id=m.job_id, direction=m.direction,
                gpu_blocks=m.gpu_blocks, host_blocks=m.host_blocks, pool=self.pool.spec))

    def _done(self, done: KVCopyDone) -> None:
        move = self.table.finish(done.move_id, ok=done.error is None)
        if move is None:
            return  # a report we sent ourselves, or of a move already timed out
        if done.error is None:
            self.stats["offloads" if move.direction == "offload" else "uploads"] += 1
            self.stats["blocks_moved"] += len(move.gpu_blocks)
            self.stats["copy_seconds"] += done.seconds
        else:
            self.stats["failed"] += 1
        self._start_copies()

    def _finish(self, move_id: int, error: str, timed_out: bool = False) -> None:
        """End a move on the worker's behalf (it will not report it)."""
        move = self.table.finish(move_id, ok=False)
        if move is not None:
            self.stats["failed"] += 1
            self._report(move, error, timed_out)
            self._start_copies()

    def _report(self, move: Move, error: str, timed_out: bool = False) -> None:
        self._reports.send(names.kv_done_key(self.config.replica), KVCopyDone(
            replica=self.config.replica, move_id=move.move_id, job_id=move.job_id, direction=move.direction,
            error=error, timed_out=timed_out))

    async def _watch_deadlines(self) -> None:
        timeout = self.config.copy_timeout
        while not self._stopping:
            await asyncio.sleep(min(timeout / 4, 1.0))
            for m in self.table.overdue(time.monotonic(), timeout):
                log.error("KV copy overdue", job_id=m.job_id, direction=m.direction, seconds=timeout)
                self._finish(m.move_id, f"copy not done within {timeout:g}s", timed_out=True)
