"""Pytest fixtures for the bus, registered in tests/conftest.py with
`from fastserve.common.testing import *`.

RabbitMQ tests need a broker at $FASTSERVE_TEST_BROKER (default
amqp://guest:guest@127.0.0.1:5672/). Without one they are skipped with the
reason printed, except when CI=true: there a missing broker is a failure, so
CI can never pass by skipping the integration tests.
Every test gets its own bus namespace, so concurrent runs never share queues.
"""
from __future__ import annotations

import os
import socket
import sys
import uuid
from collections.abc import AsyncIterator
from urllib.parse import urlparse

import pytest

__all__ = ["rabbitmq_url", "bus_namespace", "memory_bus", "rabbit_bus", "bus", "require_rabbitmq"]

DEFAULT_TEST_BROKER = "amqp://guest:guest@127.0.0.1:5672/"


def broker_url() -> str:
    return os.environ.get("FASTSERVE_TEST_BROKER", DEFAULT_TEST_BROKER)


def broker_unavailable_reason(url: str, timeout: float = 1.0) -> str | None:
    """None when something accepts TCP connections at the broker address."""
    parsed = urlparse(url)
    host, port = parsed.hostname or "127.0.0.1", parsed.port or 5672
    try:
        socket.create_connection((host, port), timeout).close()
    except OSError as exc:
        return f"RabbitMQ not reachable at {host}:{port} ({exc})"
    return None


def require_rabbitmq() -> str:
    """The broker URL, or skip (fail when CI=true) with the reason."""
    url = broker_url()
    reason = broker_unavailable_reason(url)
    if reason is not None:
        skip_unless_ci(reason)
    return url


def skip_unless_ci(reason: str) -> None:
    """Skip a RabbitMQ test with the reason printed; under CI=true fail instead,
    so CI can never pass by skipping the broker tests."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{reason}; CI=true requires RabbitMQ and its tools", pytrace=False)
    print(f"skipping RabbitMQ test: {reason}", file=sys.stderr)
    pytest.skip(reason)


@pytest.fixture
def rabbitmq_url() -> str:
    return require_rabbitmq()


@pytest.fixture
def bus_namespace() -> str:
    return f"test-{uuid.uuid4().hex[:12]}"


@pytest.fixture
async def memory_bus(bus_namespace: str) -> AsyncIterator:
    from fastserve.common.bus_memory import MemoryBus

    bus = MemoryBus(namespace=bus_namespace)
    await bus.connect()
    yield bus
    await bus.close()


@pytest.fixture
async def rabbit_bus(rabbitmq_url: str, bus_namespace: str) -> AsyncIterator:
    from fastserve.common.bus_rabbit import RabbitBus

    bus = RabbitBus(rabbitmq_url, namespace=bus_namespace, connection_name=f"pytest-{bus_namespace}")
    await bus.connect()
    yield bus
    await bus.delete_declared()
    await bus.close()


@pytest.fixture(params=["memory", "rabbitmq"])
def bus(request: pytest.FixtureRequest):
    """The same test on both buses."""
    return request.getfixturevalue("memory_bus" if request.param == "memory" else "rabbit_bus")
