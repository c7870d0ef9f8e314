"""The KV-store service: owns the host KV pool of a replica on this node and
turns the placement policy's plans into block copies for the worker.

The scheduler core (with its placement policy) decides which job moves and
which blocks it gets; this service creates the shared-memory pool the workers
map, keeps the authoritative record of where every job's KV lives, sends one
`KVCopy` per move to the worker, and forwards the worker's `KVCopyDone` to
the scheduler once its record is updated. No block ever travels on the bus.
"""
from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass, field

import structlog

from fastserve.common import names
from fastserve.common.bus import Bus
from fastserve.common.lifecycle import ServiceTasks, send_heartbeats
from fastserve.common.schemas import KVCopy, KVCopyDone, KVPlan, decode, encode
from fastserve.common.host_pool import HostKVPool, PoolSpec, default_pool_path, kv_bytes_per_block

log = structlog.get_logger("fastserve.kvstore")


@dataclass
class KVStoreServiceConfig:
    model: str  # checkpoint directory: the block size in bytes comes from its config.json
    replica: str = "default"
    instance_id: str = ""
    block_size: int = 16
    dtype: str = "float32"
    host_kv_blocks: int = 0
    host_kv_path: str | None = None  # None: default_pool_path(replica)
    heartbeat_interval: float = 1.0

    def __post_init__(self) -> None:
        if not self.instance_id:
            self.instance_id = f"kvstore-{self.replica}-{uuid.uuid4().hex[:6]}"
        if self.host_kv_blocks < 0 or self.block_size <= 0:
            raise ValueError("host_kv_blocks must be >= 0 and block_size > 0")


@dataclass
class Placement:
    """Where one job's KV is: 'gpu', 'host', or moving between them."""

    state: str = "gpu"  # "gpu" | "offloading" | "host" | "uploading"
    host_blocks: list[int] = field(default_factory=list)
    gpu_blocks: list[int] = field(default_factory=list)


class PlacementTable:
    """The pure bookkeeping part (no I/O), checked by asserts."""

    def __init__(self, num_host_blocks: int):
        self.num_host_blocks = num_host_blocks
        self.jobs: dict[str, Placement] = {}
        self.host_owner: dict[int, str] = {}  # host block -> job

    def begin(self, job_id: str, direction: str, src: list[int], dst: list[int]) -> None:
        p = self.jobs.setdefault(job_id, Placement())
        host = dst if direction == "offload" else src
        bad = [b for b in host if not 0 <= b < self.num_host_blocks]
        if bad:
            raise ValueError(f"job {job_id}: host blocks {bad[:5]} outside the pool of {self.num_host_blocks}")
        if direction == "offload":
            taken = [b for b in dst if self.host_owner.get(b, job_id) != job_id]
            if taken:
                raise ValueError(f"job {job_id}: host blocks {taken[:5]} still hold another job's KV")
            for b in dst:
                self.host_owner[b] = job_id
            p.state, p.host_blocks, p.gpu_blocks = "offloading", list(dst), list(src)
        else:
            p.state, p.gpu_blocks = "uploading", list(dst)

    def finish(self, job_id: str, direction: str) -> None:
        p = self.jobs.get(job_id)
        if p is None:
            return
        if direction == "offload":
            p.state, p.gpu_blocks = "host", []
        else:
            self._release_host(job_id, p)
            p.state = "gpu"

    def free(self, job_id: str) -> None:
        p = self.jobs.pop(job_id, None)
        if p is not None:
            self._release_host(job_id, p)

    def _release_host(self, job_id: str, p: Placement) -> None:
        for b in p.host_blocks:
            assert self.host_owner.get(b) == job_id, (b, job_id)
            del self.host_owner[b]
        p.host_blocks = []

    def host_blocks_used(self) -> int:
        return len(self.host_owner)

    def count(self, state: str) -> int:
        return sum(1 for p in self.jobs.values() if p.state == state)


class KVStoreService:
    def __init__(self, config: KVStoreServiceConfig, bus: Bus):
        self.config = config
        self.bus = bus
        self.pool: HostKVPool | None = None
        self.table = PlacementTable(config.host_kv_blocks)
        self._inflight: dict[str, KVCopy] = {}
        self._free_after: set[str] = set()
        self._tasks = ServiceTasks(log)
        self._stopping = False
        self.stats = {"offloads": 0, "uploads": 0, "blocks_moved": 0, "copy_seconds": 0.0}

    async def start(self) -> None:
        c = self.config
        bpb = kv_bytes_per_block(c.model, c.block_size, c.dtype)
        spec = PoolSpec(c.host_kv_path or str(default_pool_path(c.replica)), c.host_kv_blocks, bpb)
        self.pool = await asyncio.to_thread(HostKVPool.create, spec)
        q = names.kvstore_queue(c.replica)
        await self.bus.declare_exchange(names.EVENTS_EXCHANGE)
        await self.bus.declare_queue(q, durable=False)
        await self.bus.declare_queue(names.worker_queue(c.replica), durable=False)
        await self.bus.declare_queue(names.scheduler_queue(c.replica), durable=False)
        self._tasks.add_subscription(await self.bus.consume(q, self._on_message, prefetch=64))
        self._tasks.spawn(send_heartbeats(self.bus, "kvstore", c.instance_id, c.heartbeat_interval, self.info,
                                          lambda: not self._stopping, log), "kvstore-heartbeat")
        log.info("kvstore started", replica=c.replica, pool=spec.path, host_blocks=spec.num_blocks,
                 bytes_per_block=bpb, pool_mib=round(spec.nbytes / 2**20, 1))

    async def stop(self) -> None:
        self._stopping = True
        await self._tasks.close()
        if self.pool is not None:
            self.pool.close()

    def info(self) -> dict:
        return {"replica": self.config.replica, "pool": self.pool.spec.to_dict() if self.pool else None,
                "host_blocks_used": self.table.host_blocks_used(), "jobs_on_host": self.table.count("host"),
                "copies_in_flight": len(self._inflight), **self.stats}

    async def _on_message(self, body: bytes, headers: dict) -> None:
        msg = decode(body, (KVPlan, KVCopyDone))
        if isinstance(msg, KVPlan):
            await self._plan(msg)
        else:
            await self._done(msg)

    async def _plan(self, plan: KVPlan) -> None:
        c = self.config
        for job_id in plan.free:
            if any(cp.job_id == job_id for cp in self._inflight.values()):
                self._free_after.add(job_id)  # its copy still writes those blocks
            else:
                self.table.free(job_id)
        for job_id, direction, src, dst in plan.moves:
            copy = KVCopy(replica=plan.replica, copy_id=uuid.uuid4().hex[:12], job_id=job_id,
                          direction=direction, src_blocks=list(src), dst_blocks=list(dst),
                          after_iteration=plan.iteration - 1, reply_to=names.kvstore_queue(c.replica))
            try:
                self.table.begin(job_id, direction, copy.src_blocks, copy.dst_blocks)
            except ValueError as exc:
                # A plan that would corrupt another job's KV: refuse it and tell the scheduler.
                log.error("bad KV move", job_id=job_id, error=str(exc))
                await self._reply(KVCopyDone(replica=plan.replica, copy_id=copy.copy_id, job_id=job_id,
                                             direction=direction, error=str(exc)))
                continue
            self._inflight[copy.copy_id] = copy
            log.debug("kv move", job_id=job_id, direction=direction, blocks=len(copy.src_blocks))
            try:
                await self.bus.publish(names.worker_queue(plan.replica), encode(copy))
            except Exception as exc:  # the scheduler must hear of it, or the job waits forever
                log.exception("copy command not delivered", job_id=job_id)
                await self._done(KVCopyDone(replica=plan.replica, copy_id=copy.copy_id, job_id=job_id,
                                            direction=direction, error=f"not delivered to the worker: {exc}"))

    async def _done(self, done: KVCopyDone) -> None:
        copy = self._inflight.pop(done.copy_id, None)
        if copy is None:
            log.warning("unknown copy report", copy_id=done.copy_id, job_id=done.job_id)
            return
        if done.error is None:
            self.table.finish(done.job_id, done.direction)
            self.stats["offloads" if done.direction == "offload" else "uploads"] += 1
            self.stats["blocks_moved"] += len(copy.src_blocks)
            self.stats["copy_seconds"] += done.seconds
        if done.job_id in self._free_after and not any(cp.job_id == done.job_id for cp in self._inflight.values()):
            self._free_after.discard(done.job_id)
            self.table.free(done.job_id)
        await self._reply(done)

    async def _reply(self, done: KVCopyDone) -> None:
        await self.bus.publish(names.scheduler_queue(done.replica), encode(done))
