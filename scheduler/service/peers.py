"""Which worker and which KV store a replica's scheduler works with, learned
from their heartbeats, and when one counts as lost.

Losses are judged only while the bus itself works: the scheduler hears its
own heartbeat. During a broker outage every service looks silent to every
other, and declaring them all dead would only cost recomputation.
"""
from __future__ import annotations

from dataclasses import dataclass

from fastserve.common.schemas import Heartbeat, PoolSpec, WorkerInfo


@dataclass
class Peer:
    instance_id: str
    queue: str
    last_seen: float  # time.monotonic()
    worker: WorkerInfo | None = None
    pool: PoolSpec | None = None
    scheduler_id: str = ""  # whose commands the worker runs
    epoch: int = -1  # that scheduler's epoch the worker last saw
    received: int = -1  # highest iteration of that epoch the worker received
    completed: int = -1  # highest iteration of that epoch the worker finished


class Peers:
    def __init__(self, replica: str, instance_id: str, worker_timeout: float, kvstore_timeout: float) -> None:
        self.replica = replica
        self.instance_id = instance_id
        self.worker_timeout = worker_timeout
        self.kvstore_timeout = kvstore_timeout
        self.worker: Peer | None = None
        self.kvstore: Peer | None = None
        self.bus_seen: float | None = None  # when our own heartbeat last came back
        self.bus_back_at: float | None = None  # when the bus came back after a silence

    def heard(self, hb: Heartbeat, now: float) -> list[str]:
        """Apply a heartbeat; returns what changed: "worker_new",
        "worker_replaced", "kvstore_new", "kvstore_replaced"."""
        if hb.service == "scheduler" and hb.instance_id == self.instance_id:
            if self.bus_seen is None or now - self.bus_seen > 3 * max(self.worker_timeout, 1.0) / 10:
                self.bus_back_at = now
            self.bus_seen = now
            return []
        if hb.replica != self.replica:
            return []
        if hb.service == "worker" and hb.worker is not None:
            return self._heard("worker", hb, now, self.worker, dict(worker=hb.worker))
        if hb.service == "kvstore" and hb.pool is not None:
            return self._heard("kvstore", hb, now, self.kvstore, dict(pool=hb.pool))
        return []

    def _heard(self, kind: str, hb: Heartbeat, now: float, current: Peer | None, info: dict) -> list[str]:
        if current is not None and current.instance_id == hb.instance_id:
            current.last_seen = now
            if kind == "worker":
                current.scheduler_id, current.epoch = hb.scheduler_id, hb.epoch
                current.received, current.completed = hb.received, hb.completed
            return []
        peer = Peer(hb.instance_id, hb.queue, now, scheduler_id=hb.scheduler_id, epoch=hb.epoch,
                    received=hb.received, completed=hb.completed, **info)
        setattr(self, kind, peer)
        return [f"{kind}_replaced" if current is not None else f"{kind}_new"]

    def bus_healthy(self, now: float, settle: float = 0.0) -> bool:
        """Our own heartbeat came back recently (and, with `settle`, the bus
        has been back for that long: peers had time to be heard again)."""
        if self.bus_seen is None or now - self.bus_seen > max(self.worker_timeout, self.kvstore_timeout) / 2:
            return False
        return self.bus_back_at is None or now - self.bus_back_at >= settle

    def check(self, now: float) -> list[str]:
        """Peers silent for too long while the bus works: "worker_lost", "kvstore_lost"."""
        if not self.bus_healthy(now, settle=min(self.worker_timeout, self.kvstore_timeout) / 2):
            return []
        lost = []
        if self.worker is not None and now - self.worker.last_seen > self.worker_timeout:
            self.worker = None
            lost.append("worker_lost")
        if self.kvstore is not None and now - self.kvstore.last_seen > self.kvstore_timeout:
            self.kvstore = None
            lost.append("kvstore_lost")
        return lost

    def drop(self, kind: str) -> None:
        """Forget a peer known to be gone (its queue vanished)."""
        setattr(self, kind, None)
