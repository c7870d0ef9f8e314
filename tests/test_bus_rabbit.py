"""RabbitMQ-only behaviour: namespaces isolate runs; make_bus picks the implementation."""
import asyncio

import pytest

from fastserve.common.bus import UnroutableError, make_bus
from fastserve.common.bus_memory import MemoryBus, topic_matches
from fastserve.common.bus_rabbit import RabbitBus
from fastserve.common.testing import skip_unless_ci

pytestmark = pytest.mark.timeout(30)


async def test_namespaces_isolate_buses_on_one_broker(rabbitmq_url, bus_namespace):
    a = RabbitBus(rabbitmq_url, namespace=bus_namespace + "-a")
    b = RabbitBus(rabbitmq_url, namespace=bus_namespace + "-b")
    async with a, b:
        try:
            await a.declare_queue("shared.name")
            with pytest.raises(UnroutableError):
                await b.publish("shared.name", b"x")
            got = asyncio.Queue()

            async def handler(body, headers):
                await got.put(body)

            await a.consume("shared.name", handler)
            await a.publish("shared.name", b"mine")
            assert await asyncio.wait_for(got.get(), 5) == b"mine"
        finally:
            await a.delete_declared()
            await b.delete_declared()


async def test_second_connection_consumes_queue_declared_elsewhere(rabbitmq_url, rabbit_bus, bus_namespace):
    await rabbit_bus.declare_queue("jobs.shared")
    await rabbit_bus.publish("jobs.shared", b"job")
    other = RabbitBus(rabbitmq_url, namespace=bus_namespace, connection_name="pytest-other")
    async with other:
        got = asyncio.Queue()

        async def handler(body, headers):
            await got.put(body)

        await other.consume("jobs.shared", handler)  # passive: not declared by `other`
        assert await asyncio.wait_for(got.get(), 5) == b"job"


def test_make_bus():
    assert isinstance(make_bus("memory://"), MemoryBus)
    assert isinstance(make_bus("amqp://guest:guest@localhost/", namespace="x"), RabbitBus)
    with pytest.raises(ValueError, match="unknown broker URL"):
        make_bus("redis://x")


@pytest.mark.parametrize(
    "pattern, key, expected",
    [
        ("heartbeat.#", "heartbeat.scheduler.s1", True),
        ("heartbeat.#", "heartbeat", True),
        ("heartbeat.*", "heartbeat.scheduler.s1", False),
        ("heartbeat.*.s1", "heartbeat.worker.s1", True),
        ("#", "a.b.c", True),
        ("a.#.c", "a.c", True),
        ("a.#.c", "a.x.y.c", True),
        ("a.#.c", "a.x.y", False),
        ("stats.#", "heartbeat.s", False),
    ],
)
def test_topic_matching_like_rabbitmq(pattern, key, expected):
    assert topic_matches(pattern, key) is expected


def _close_connection_by_name(name: str) -> None:
    import shutil
    import subprocess

    if shutil.which("rabbitmqctl") is None:
        skip_unless_ci("rabbitmqctl not found: cannot force a connection loss")
    listing = subprocess.run(["rabbitmqctl", "-q", "list_connections", "pid", "client_properties"],
                             capture_output=True, text=True, timeout=30)
    if listing.returncode != 0:
        skip_unless_ci(f"rabbitmqctl cannot list connections: {listing.stderr.strip()[:200]}")
    pids = [line.split("\t", 1)[0] for line in listing.stdout.splitlines() if name in line]
    assert len(pids) == 1, listing.stdout
    subprocess.run(["rabbitmqctl", "close_connection", pids[0], "test: forced connection loss"],
                   check=True, capture_output=True, timeout=30)


@pytest.mark.timeout(90)
async def test_consumer_and_publisher_survive_a_lost_connection(rabbitmq_url, bus_namespace):
    name = f"pytest-reconnect-{bus_namespace}"
    bus = RabbitBus(rabbitmq_url, namespace=bus_namespace, connection_name=name, reconnect_interval=0.3)
    async with bus:
        try:
            await bus.declare_queue("durable.q")
            await bus.declare_queue("excl.q", durable=False, exclusive=True, auto_delete=True)
            got = {"durable.q": asyncio.Queue(), "excl.q": asyncio.Queue()}
            for q in got:
                await bus.consume(q, lambda body, headers, q=q: got[q].put(body))
            for q in got:
                await bus.publish(q, b"before")
                assert await asyncio.wait_for(got[q].get(), 5) == b"before"
            await asyncio.to_thread(_close_connection_by_name, name)
            # Publishing retries until the robust connection is back; the consumers are restored.
            for q in got:
                deadline = asyncio.get_running_loop().time() + 30
                while True:
                    try:
                        await bus.publish(q, b"after")
                        break
                    except Exception:
                        assert asyncio.get_running_loop().time() < deadline, "never reconnected"
                        await asyncio.sleep(0.2)
                assert await asyncio.wait_for(got[q].get(), 15) == b"after"
        finally:
            await bus.delete_declared()


def test_missing_broker_skips_locally_and_fails_in_ci(monkeypatch):
    from fastserve.common.testing import require_rabbitmq

    monkeypatch.setenv("FASTSERVE_TEST_BROKER", "amqp://guest:guest@127.0.0.1:1/")
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="not reachable at 127.0.0.1:1"):
        require_rabbitmq()
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI=true requires RabbitMQ"):
        require_rabbitmq()
