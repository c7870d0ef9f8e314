"""The message bus: one async interface, two implementations.

- `MemoryBus` (fastserve.common.bus_memory): in-process, for the one-process
  embedded mode and fast tests.
- `RabbitBus` (fastserve.common.bus_rabbit): RabbitMQ through aio-pika.

Semantics both implement (tests/test_bus_*.py run the same checks on both):
- `publish(key, body)` with exchange "" delivers to the queue named `key`; if
  no such queue exists it raises `UnroutableError` (a job is never silently
  dropped). With a topic exchange it delivers to every bound queue (none is
  fine: a broadcast nobody listens to).
- `consume(queue, handler)` runs `handler(body, headers)` for one message at a
  time, in delivery order; several consumers of one queue compete (replicas
  share the job queue). A handler that returns acks the message. A handler that
  raises (`SchemaError` for bad data, or anything else) gets the message
  dead-lettered to `names.DEAD_LETTER_QUEUE` and logged; the consumer goes on.
- `consume_deliveries(queue, handler, concurrency=N)` is the same with the
  message's AMQP properties (`Delivery`), and up to N handlers at once, each
  message acked when its own handler returns (the public submission queue:
  a request is acked when its result is out, so a consumer that dies leaves
  its requests to another). A cancelled subscription returns the messages
  whose handlers were still running to the queue (`redelivered` then).
- Every name is prefixed by `namespace` when one is given, so that test runs
  (or deployments) sharing a broker never see each other's queues. Services
  always pass the plain names from `fastserve.common.names`.
"""
from __future__ import annotations

import abc
import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

Headers = dict[str, Any]
Handler = Callable[[bytes, Headers], Awaitable[None]]
MSGPACK = "application/msgpack"
JSON = "application/json"


@dataclass(frozen=True)
class Properties:
    """The AMQP properties a message may carry (fastserve's own messages need
    none of them; the public submission interface does)."""

    content_type: str = MSGPACK
    reply_to: str | None = None
    correlation_id: str | None = None
    expiration: float | None = None  # seconds the message may wait in its queue
    timestamp: float | None = None  # time.time() when it was sent
    redelivered: bool = False  # on delivery: a consumer had it and went away without acking


@dataclass(frozen=True)
class Delivery:
    body: bytes
    headers: Headers = field(default_factory=dict)
    props: Properties = Properties()


DeliveryHandler = Callable[[Delivery], Awaitable[None]]


def _fresh_log_context(base: dict[str, Any]) -> None:
    """Reset structlog contextvars (in a consumer's own task) to what they were
    when it subscribed, so a job_id bound by one handler never tags the next message."""
    import structlog

    structlog.contextvars.clear_contextvars()
    if base:
        structlog.contextvars.bind_contextvars(**base)


class _HandlerSlots:
    """How a subscription runs its handler: inline, one message after the
    other, with concurrency 1 (order kept); otherwise up to `concurrency`
    handler tasks at once, each acking its own message. Shared by both buses."""

    def __init__(self, concurrency: int) -> None:
        self.concurrent = concurrency > 1
        self._free = asyncio.Semaphore(concurrency)
        self._running: set[asyncio.Task] = set()

    async def acquire(self) -> None:
        if self.concurrent:
            await self._free.acquire()

    def release(self) -> None:
        if self.concurrent:
            self._free.release()

    async def run(self, handle: Callable[[Any], Awaitable[None]], item: Any, name: str) -> None:
        """Handle `item` (its slot acquired): inline, or as a task that frees the slot when done."""
        if not self.concurrent:
            await handle(item)
            return
        task = asyncio.create_task(handle(item), name=name)
        self._running.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task) -> None:
        self._running.discard(task)
        self._free.release()

    async def cancel(self, *tasks: asyncio.Task | None) -> None:
        """Cancel `tasks` (the consuming loop) and every handler still running, and wait for them."""
        for task in [*tasks, *self._running]:
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task


class BusError(RuntimeError):
    pass


class UnroutableError(BusError):
    """A point-to-point publish found no queue of that name."""


class Subscription(abc.ABC):
    """Handle returned by `Bus.consume`."""

    @abc.abstractmethod
    async def cancel(self) -> None:
        """Stop consuming; a message being handled is returned to the queue. Idempotent."""


class Bus(abc.ABC):
    # Queued messages outlive this process (RabbitMQ); not so on the in-memory bus.
    durable = True

    def __init__(self, namespace: str = "") -> None:
        self.namespace = namespace

    def full_name(self, name: str) -> str:
        """The broker-side name of an exchange or queue ("" stays the default exchange)."""
        if not name or not self.namespace:
            return name
        return f"{self.namespace}.{name}"

    @abc.abstractmethod
    async def connect(self) -> None:
        """Open the connection and declare the dead-letter exchange and queue."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Cancel every subscription and close the connection. Idempotent."""

    @abc.abstractmethod
    async def declare_exchange(self, name: str, kind: str = "topic") -> None:
        """Declare a durable exchange ("topic" or "fanout"). Idempotent."""

    @abc.abstractmethod
    async def declare_queue(
        self,
        name: str,
        *,
        durable: bool = True,
        exclusive: bool = False,
        auto_delete: bool = False,
        bindings: Iterable[tuple[str, str]] = (),
    ) -> None:
        """Declare a queue that dead-letters into the DLX, and bind it to
        (exchange, routing-key pattern) pairs (the exchanges are declared as
        topic exchanges if they do not exist yet). Idempotent.

        exclusive: the queue belongs to this connection and disappears with it
        (per-gateway reply queues, per-instance broadcast queues)."""

    @abc.abstractmethod
    async def publish(
        self,
        key: str,
        body: bytes,
        headers: Headers | None = None,
        *,
        exchange: str = "",
        persistent: bool = False,
        props: Properties | None = None,
        verbatim: bool = False,
    ) -> None:
        """Publish and wait for the broker's confirm. Raises UnroutableError
        for exchange "" and an unknown queue. verbatim: `key` is a broker-side
        queue name already (a reply_to property), not prefixed by the namespace."""

    async def consume(self, queue: str, handler: Handler, *, prefetch: int = 32) -> Subscription:
        """Start consuming a declared queue (see the module doc for semantics).
        prefetch: messages the broker may push ahead of the handler."""
        async def deliver(d: Delivery) -> None:
            await handler(d.body, d.headers)

        return await self.consume_deliveries(queue, deliver, prefetch=prefetch)

    @abc.abstractmethod
    async def consume_deliveries(self, queue: str, handler: DeliveryHandler, *, prefetch: int = 32,
                                 concurrency: int = 1) -> Subscription:
        """`consume` with the whole Delivery, and up to `concurrency` handlers
        at once (order is kept only with 1)."""

    async def __aenter__(self) -> Bus:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


def make_bus(url: str, *, namespace: str = "", connection_name: str = "fastserve") -> Bus:
    """`memory://` -> MemoryBus, `amqp://...`/`amqps://...` -> RabbitBus."""
    if url.startswith("memory://"):
        from fastserve.common.bus_memory import MemoryBus

        return MemoryBus(namespace=namespace)
    if url.startswith(("amqp://", "amqps://")):
        from fastserve.common.bus_rabbit import RabbitBus

        return RabbitBus(url, namespace=namespace, connection_name=connection_name)
    raise ValueError(f"unknown broker URL {url!r}: expected memory:// or amqp://user:pass@host:port/")


def __getattr__(name: str) -> Any:
    # `from fastserve.common.bus import MemoryBus, RabbitBus` without importing aio-pika eagerly.
    if name == "MemoryBus":
        from fastserve.common.bus_memory import MemoryBus

        return MemoryBus
    if name == "RabbitBus":
        from fastserve.common.bus_rabbit import RabbitBus

        return RabbitBus
    raise AttributeError(name)
