"""What every service starts and must end: its bus subscriptions and its
background tasks, and the heartbeat that shows it is alive.

A service spawns every task through `ServiceTasks` (no untracked
`create_task`), so `close()` can cancel and await all of them. A task that
died with an exception is logged when it dies, not swallowed at shutdown.
"""
from __future__ import annotations

import asyncio
import time
from typing import Any, Callable, Coroutine

from fastserve.common import names
from fastserve.common.bus import Bus
from fastserve.common.schemas import Heartbeat, encode


class ServiceTasks:
    """The subscriptions and tasks of one service, ended together by `close()`."""

    def __init__(self, log) -> None:
        self.log = log
        self._subs: list = []
        self._tasks: set[asyncio.Task] = set()

    def add_subscription(self, sub) -> None:
        self._subs.append(sub)

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._finished)
        return task

    def __len__(self) -> int:
        return len(self._tasks)

    def _finished(self, task: asyncio.Task) -> None:
        # Finished tasks leave the set, so short-lived ones (one per copy)
        # do not pile up; their exception is retrieved and logged here.
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            exc = task.exception()
            self.log.error("background task died", task=task.get_name(),
                           error=f"{type(exc).__name__}: {exc}", exc_info=exc)

    async def close(self) -> None:
        """Stop delivery first (no handler starts after this), then cancel
        and await every task still running."""
        subs, self._subs = self._subs, []
        for sub in subs:
            try:
                await sub.cancel()
            except Exception:  # the others must still be cancelled
                self.log.exception("cancelling a subscription failed")
        tasks = list(self._tasks)
        for t in tasks:
            t.cancel()
        # Exceptions were logged by _finished; gather only collects them.
        await asyncio.gather(*tasks, return_exceptions=True)
        assert all(t.done() for t in tasks)


async def send_heartbeats(bus: Bus, service: str, instance_id: str, interval: float,
                          fields: Callable[[], dict], alive: Callable[[], bool], log) -> None:
    """Publish a `Heartbeat` every `interval` seconds while `alive()`;
    `fields()` gives its other fields (replica, queue, worker, pool, info...)."""
    key = names.heartbeat_key(service, instance_id)
    while alive():
        hb = Heartbeat(service=service, instance_id=instance_id, ts=time.time(), **fields())
        try:
            await bus.publish(key, encode(hb), exchange=names.EVENTS_EXCHANGE)
        except Exception as exc:  # the bus reconnects; liveness must not kill the service
            log.warning("heartbeat failed", error=str(exc))
        await asyncio.sleep(interval)
