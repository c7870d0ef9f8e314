"""ServiceTasks and send_heartbeats (common/lifecycle.py): every task is
cancelled and awaited on close, and a task that died is logged, not swallowed."""
from __future__ import annotations

import asyncio

from fastserve.common import names
from fastserve.common.lifecycle import ServiceTasks, send_heartbeats
from fastserve.common.schemas import Heartbeat, decode


class RecordingLog:
    def __init__(self):
        self.lines: list[tuple[str, str, dict]] = []

    def _add(self, level, event, **kw):
        self.lines.append((level, event, kw))

    def error(self, event, **kw):
        self._add("error", event, **kw)

    def warning(self, event, **kw):
        self._add("warning", event, **kw)

    def exception(self, event, **kw):
        self._add("exception", event, **kw)


class FakeSub:
    def __init__(self, fail: bool = False):
        self.cancelled = False
        self.fail = fail

    async def cancel(self):
        self.cancelled = True
        if self.fail:
            raise ConnectionError("channel closed")


async def test_close_cancels_subscriptions_and_tasks_and_logs_a_dead_task():
    log = RecordingLog()
    tasks = ServiceTasks(log)
    subs = [FakeSub(fail=True), FakeSub()]
    for sub in subs:
        tasks.add_subscription(sub)
    forever = tasks.spawn(asyncio.sleep(3600), "forever")

    async def boom():
        raise ValueError("bad state")

    tasks.spawn(boom(), "boom")
    await asyncio.sleep(0.01)
    assert len(tasks) == 1  # the dead one left the set and was logged at once
    died = [kw for level, event, kw in log.lines if event == "background task died"]
    assert died == [{"task": "boom", "error": "ValueError: bad state", "exc_info": died[0]["exc_info"]}]
    assert isinstance(died[0]["exc_info"], ValueError)

    await tasks.close()
    assert all(sub.cancelled for sub in subs)  # the failing one did not stop the other
    assert [event for level, event, kw in log.lines if level == "exception"] == ["cancelling a subscription failed"]
    assert forever.cancelled() and len(tasks) == 0
    # A cancelled task is not an error.
    assert sum(1 for _, event, _ in log.lines if event == "background task died") == 1


async def test_heartbeats_until_not_alive():
    sent = []

    class Bus:
        async def publish(self, key, body, exchange=""):
            sent.append((key, exchange, decode(body, Heartbeat)))
            if len(sent) == 2:
                raise ConnectionError("broker away")

    beats = iter(range(100))
    alive = {"n": 3}

    def still_alive():
        alive["n"] -= 1
        return alive["n"] >= 0

    log = RecordingLog()
    await asyncio.wait_for(send_heartbeats(Bus(), "worker", "w-1", 0.001, lambda: {"info": {"beat": next(beats)}},
                                           still_alive, log), 5)
    assert [hb.info["beat"] for _, _, hb in sent] == [0, 1, 2]  # a failed publish did not stop it
    assert {(k, x) for k, x, _ in sent} == {(names.heartbeat_key("worker", "w-1"), names.EVENTS_EXCHANGE)}
    assert all(hb.service == "worker" and hb.instance_id == "w-1" for _, _, hb in sent)
    assert [event for level, event, kw in log.lines] == ["heartbeat failed"]
