"""The same bus semantics on MemoryBus and on RabbitMQ (the `bus` fixture runs both)."""
import asyncio

import pytest

from fastserve.common import names
from fastserve.common.bus import UnroutableError
from fastserve.common.schemas import JobCancel, decode, encode

pytestmark = pytest.mark.timeout(30)


class Collector:
    def __init__(self, fail_on=None):
        self.items = []
        self.fail_on = fail_on or (lambda body: None)
        self.event = asyncio.Event()

    async def __call__(self, body, headers):
        exc = self.fail_on(body)
        if exc is not None:
            raise exc
        self.items.append((body, headers))
        self.event.set()

    async def wait_for(self, n, timeout=10.0):
        async def _wait():
            while len(self.items) < n:
                self.event.clear()
                await self.event.wait()

        await asyncio.wait_for(_wait(), timeout)
        return self.items


async def test_point_to_point_in_order_with_headers(bus):
    await bus.declare_queue("q.work")
    got = Collector()
    await bus.consume("q.work", got, prefetch=8)
    for i in range(40):
        await bus.publish("q.work", f"m{i}".encode(), {"trace_id": f"t{i}", "n": i})
    items = await got.wait_for(40)
    assert [b for b, _ in items] == [f"m{i}".encode() for i in range(40)]
    assert items[7][1]["trace_id"] == "t7" and items[7][1]["n"] == 7


async def test_publish_to_missing_queue_is_unroutable(bus):
    with pytest.raises(UnroutableError, match="q.nowhere"):
        await bus.publish("q.nowhere", b"x")


async def test_messages_wait_for_a_late_consumer(bus):
    await bus.declare_queue("q.late")
    for i in range(3):
        await bus.publish("q.late", bytes([i]), persistent=True)
    got = Collector()
    await bus.consume("q.late", got)
    assert [b for b, _ in await got.wait_for(3)] == [b"\x00", b"\x01", b"\x02"]


async def test_topic_broadcast_reaches_every_matching_queue(bus):
    hb_a, hb_b, stats = Collector(), Collector(), Collector()
    await bus.declare_queue("q.a", exclusive=True, auto_delete=True,
                            bindings=[(names.EVENTS_EXCHANGE, names.HEARTBEAT_PATTERN)])
    await bus.declare_queue("q.b", exclusive=True, auto_delete=True,
                            bindings=[(names.EVENTS_EXCHANGE, names.HEARTBEAT_PATTERN)])
    await bus.declare_queue("q.s", exclusive=True, auto_delete=True,
                            bindings=[(names.EVENTS_EXCHANGE, names.STATS_PATTERN)])
    for q, c in (("q.a", hb_a), ("q.b", hb_b), ("q.s", stats)):
        await bus.consume(q, c)
    await bus.publish(names.heartbeat_key("scheduler", "s1"), b"hb", exchange=names.EVENTS_EXCHANGE)
    await bus.publish(names.stats_key("s1"), b"st", exchange=names.EVENTS_EXCHANGE)
    await bus.publish("unrelated.key", b"nobody", exchange=names.EVENTS_EXCHANGE)  # not an error
    assert [b for b, _ in await hb_a.wait_for(1)] == [b"hb"]
    assert [b for b, _ in await hb_b.wait_for(1)] == [b"hb"]
    assert [b for b, _ in await stats.wait_for(1)] == [b"st"]
    await asyncio.sleep(0.1)
    assert len(hb_a.items) == len(hb_b.items) == len(stats.items) == 1


async def test_competing_consumers_share_work_exactly_once(bus):
    await bus.declare_queue(names.JOB_QUEUE)

    async def slow(collector):
        async def handler(body, headers):
            await asyncio.sleep(0.005)
            await collector(body, headers)
        return handler

    a, b = Collector(), Collector()
    await bus.consume(names.JOB_QUEUE, await slow(a), prefetch=1)
    await bus.consume(names.JOB_QUEUE, await slow(b), prefetch=1)
    for i in range(30):
        await bus.publish(names.JOB_QUEUE, str(i).encode())

    async def all_done():
        while len(a.items) + len(b.items) < 30:
            await asyncio.sleep(0.01)

    await asyncio.wait_for(all_done(), 10)
    seen = sorted(int(x) for x, _ in a.items + b.items)
    assert seen == list(range(30))
    assert a.items and b.items  # both replicas got work


async def test_bad_message_goes_to_dead_letter_queue_and_consumer_survives(bus):
    await bus.declare_queue("q.jobs")
    handled = Collector()

    async def handler(body, headers):
        msg = decode(body, JobCancel)  # raises SchemaError on garbage
        if msg.job_id == "crash":
            raise RuntimeError("handler bug")
        await handled(msg.job_id.encode(), headers)

    dead = Collector()
    await bus.consume(names.DEAD_LETTER_QUEUE, dead)
    await bus.consume("q.jobs", handler)
    await bus.publish("q.jobs", b"\x00not msgpack", {"trace_id": "bad1"})
    await bus.publish("q.jobs", encode(JobCancel("ok1", "t")))
    await bus.publish("q.jobs", encode(JobCancel("crash", "t")), {"trace_id": "bad2"})
    await bus.publish("q.jobs", encode(JobCancel("ok2", "t")))
    assert [b for b, _ in await handled.wait_for(2)] == [b"ok1", b"ok2"]
    dead_items = await dead.wait_for(2)
    assert sorted(h["trace_id"] for _, h in dead_items) == ["bad1", "bad2"]
    assert dead_items[0][0] in (b"\x00not msgpack", encode(JobCancel("crash", "t")))
    assert all(h["x-death"][0]["queue"].endswith("q.jobs") for _, h in dead_items)


async def test_cancelled_subscription_leaves_messages_for_the_next_consumer(bus):
    await bus.declare_queue("q.handover")
    first = Collector()
    sub = await bus.consume("q.handover", first)
    await bus.publish("q.handover", b"1")
    await first.wait_for(1)
    await sub.cancel()
    await sub.cancel()  # idempotent
    await bus.publish("q.handover", b"2")
    await asyncio.sleep(0.05)
    assert [b for b, _ in first.items] == [b"1"]
    second = Collector()
    await bus.consume("q.handover", second)
    assert [b for b, _ in await second.wait_for(1)] == [b"2"]


async def test_deliveries_carry_properties_and_run_concurrently_each_acked_alone(bus):
    """consume_deliveries: the AMQP properties come through, N handlers run at
    once, and a cancelled subscription returns the unfinished ones, redelivered."""
    from fastserve.common.bus import JSON, Properties

    await bus.declare_queue("q.public")
    started, release = [], asyncio.Event()
    all_started = asyncio.Event()

    async def slow(d):
        started.append(d)
        if len(started) == 3:
            all_started.set()
        await release.wait()

    sub = await bus.consume_deliveries("q.public", slow, prefetch=3, concurrency=3)
    for i in range(3):
        await bus.publish("q.public", str(i).encode(), props=Properties(
            content_type=JSON, reply_to="r", correlation_id=f"c{i}", expiration=60, timestamp=1700000000.0))
    await asyncio.wait_for(all_started.wait(), 10)  # three at once: none had to finish first
    d = started[0]
    assert (d.props.content_type, d.props.reply_to, d.props.expiration, d.props.timestamp) == (
        JSON, "r", 60.0, 1700000000.0)
    assert sorted(x.props.correlation_id for x in started) == ["c0", "c1", "c2"]
    assert not any(x.props.redelivered for x in started)
    await sub.cancel()  # their handlers never returned: back to the queue
    again = []

    async def quick(d):
        again.append(d)

    await bus.consume_deliveries("q.public", quick, concurrency=2)
    for _ in range(500):
        if len(again) == 3:
            break
        await asyncio.sleep(0.01)
    assert sorted(x.body for x in again) == [b"0", b"1", b"2"]
    assert all(x.props.redelivered for x in again)
