"""The outbox: publishing never blocks the caller, keeps order per
destination, retries while the broker is away, and reports a destination
that does not exist (its consumer is gone) instead of retrying forever."""
from __future__ import annotations

import asyncio

from fastserve.common.bus import UnroutableError
from fastserve.common.outbox import Outbox
from fastserve.common.schemas import JobCancel, decode


class FlakyBus:
    def __init__(self, fail_first: int = 0, missing: set[str] = frozenset()):
        self.fail_first = fail_first
        self.missing = missing
        self.sent: list[tuple[str, str]] = []
        self.attempts = 0

    async def publish(self, key, body, headers=None, *, exchange="", persistent=False):
        self.attempts += 1
        await asyncio.sleep(0)
        if key in self.missing:
            raise UnroutableError(key)
        if self.attempts <= self.fail_first:
            raise ConnectionError("broker away")
        self.sent.append((key, decode(body).job_id))


async def test_order_is_kept_across_a_broker_outage():
    bus = FlakyBus(fail_first=3)
    failures = []
    out = Outbox(bus, lambda k, m, e: failures.append(k), retry_initial=0.001, retry_max=0.002)
    for i in range(5):
        out.send("q", JobCancel(f"j{i}", "t"))  # returns at once
    assert out.pending("q") == 5 and bus.sent == []
    assert await out.drain(5.0)
    assert bus.sent == [("q", f"j{i}") for i in range(5)] and failures == [] and bus.attempts == 8
    await out.close()


async def test_a_missing_destination_is_reported_and_dropped_the_others_go_on():
    bus = FlakyBus(missing={"gone"})
    failures = []
    out = Outbox(bus, lambda k, m, e: failures.append((k, m.job_id)), retry_initial=0.001)
    out.send("gone", JobCancel("a", "t"))
    out.send("gone", JobCancel("b", "t"))
    out.send("here", JobCancel("c", "t"))
    assert await out.drain(5.0)
    assert bus.sent == [("here", "c")]
    assert failures[0] == ("gone", "a") and out.pending("gone") == 0
    await out.close()
