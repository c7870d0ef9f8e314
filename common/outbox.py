"""Ordered, non-blocking publishing for a service loop that must never wait
on the broker.

`Outbox.send(key, msg)` returns at once; one task per destination publishes
its messages in order and waits for each confirm. A publish that fails
because the destination queue does not exist (its consumer is gone) is
reported to `on_failure` and the rest of that destination's messages are
dropped with it; any other failure (broker down, confirm timeout) is retried
with backoff until the bus is back, so nothing is lost and order holds. A
retried message may arrive twice (its first confirm was lost): receivers
deduplicate (token events carry counts, commands carry iterations).
"""
from __future__ import annotations

import asyncio
from collections import deque
from typing import Callable

import structlog

from fastserve.common.bus import Bus, UnroutableError
from fastserve.common.schemas import Message, encode

log = structlog.get_logger("fastserve.bus")

FailureHandler = Callable[[str, Message, Exception], None]


class Outbox:
    def __init__(self, bus: Bus, on_failure: FailureHandler, *, exchange: str = "",
                 retry_initial: float = 0.05, retry_max: float = 2.0) -> None:
        self.bus = bus
        self.exchange = exchange
        self.on_failure = on_failure
        self.retry_initial = retry_initial
        self.retry_max = retry_max
        self._queues: dict[str, deque[Message]] = {}
        self._wake: dict[str, asyncio.Event] = {}
        self._tasks: dict[str, asyncio.Task] = {}
        self._idle = asyncio.Event()
        self._idle.set()
        self._closed = False

    def send(self, key: str, msg: Message) -> None:
        if self._closed:
            raise RuntimeError("outbox closed")
        q = self._queues.get(key)
        if q is None:
            q = self._queues[key] = deque()
            self._wake[key] = asyncio.Event()
            self._tasks[key] = asyncio.create_task(self._run(key), name=f"outbox:{key}")
        q.append(msg)
        self._wake[key].set()
        self._idle.clear()

    def pending(self, key: str | None = None) -> int:
        if key is not None:
            return len(self._queues.get(key, ()))
        return sum(len(q) for q in self._queues.values())

    def forget(self, key: str) -> None:
        """Drop what is queued for `key` (its receiver is known to be gone)."""
        q = self._queues.get(key)
        if q:
            q.clear()

    async def drain(self, timeout: float) -> bool:
        """Wait until everything queued is published (or `timeout`)."""
        while self.pending():
            self._idle.clear()
            try:
                await asyncio.wait_for(self._idle.wait(), timeout)
            except asyncio.TimeoutError:
                return False
        return True

    async def close(self) -> None:
        self._closed = True
        tasks = list(self._tasks.values())
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _run(self, key: str) -> None:
        q, wake = self._queues[key], self._wake[key]
        while True:
            if not q:
                wake.clear()
                if not self.pending():
                    self._idle.set()
                await wake.wait()
                continue
            msg = q[0]
            delay = self.retry_initial
            while True:
                try:
                    await self.bus.publish(key, encode(msg), exchange=self.exchange)
                    break
                except UnroutableError as exc:
                    dropped = len(q)
                    q.clear()
                    log.warning("outbox.unroutable", to=key, message=type(msg).__name__, dropped=dropped)
                    self.on_failure(key, msg, exc)
                    break
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # broker down, confirm timeout: retry, in order
                    log.warning("outbox.retry", to=key, message=type(msg).__name__, error=f"{type(exc).__name__}: {exc}",
                                retry_in=round(delay, 3))
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, self.retry_max)
            if q and q[0] is msg:
                q.popleft()
