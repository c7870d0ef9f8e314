"""In-process bus with RabbitMQ's routing semantics (see fastserve.common.bus)."""
from __future__ import annotations

import asyncio
from collections.abc import Iterable
from dataclasses import dataclass, field, replace

import structlog

from fastserve.common import names
from fastserve.common.bus import (
    Bus, BusError, Delivery, DeliveryHandler, Headers, Properties, Subscription, UnroutableError, _fresh_log_context,
    _HandlerSlots,
)
from fastserve.common.schemas import SchemaError

log = structlog.get_logger("fastserve.bus")


def topic_matches(pattern: str, key: str) -> bool:
    """AMQP topic matching: `*` is exactly one word, `#` zero or more."""
    return _match(pattern.split("."), key.split("."))


def _match(pat: list[str], words: list[str]) -> bool:
    if not pat:
        return not words
    head, rest = pat[0], pat[1:]
    if head == "#":
        return any(_match(rest, words[i:]) for i in range(len(words) + 1))
    return bool(words) and head in ("*", words[0]) and _match(rest, words[1:])


@dataclass
class _Queue:
    name: str
    auto_delete: bool
    items: asyncio.Queue = field(default_factory=asyncio.Queue)
    consumers: int = 0


@dataclass
class _Exchange:
    kind: str
    bindings: list[tuple[str, str]] = field(default_factory=list)  # (queue, pattern)


class _MemorySubscription(Subscription):
    def __init__(self, bus: MemoryBus, queue: _Queue, handler: DeliveryHandler, concurrency: int = 1) -> None:
        self._bus, self._queue, self._handler = bus, queue, handler
        self._log_context = structlog.contextvars.get_contextvars()
        self._slots = _HandlerSlots(concurrency)
        self._task = asyncio.create_task(self._run(), name=f"consume:{queue.name}")
        self._cancelled = False

    async def _run(self) -> None:
        while True:
            # A slot first: a busy consumer leaves the queue's messages to the other consumers.
            await self._slots.acquire()
            try:
                item = await self._queue.items.get()
            except asyncio.CancelledError:
                self._slots.release()
                raise
            await self._slots.run(self._handle, item, f"handle:{self._queue.name}")

    async def _handle(self, item: Delivery) -> None:
        _fresh_log_context(self._log_context)
        try:
            await self._handler(item)
        except asyncio.CancelledError:
            # Like an unacked delivery on a closed channel: back to the queue.
            self._queue.items.put_nowait(replace(item, props=replace(item.props, redelivered=True)))
            raise
        except Exception as exc:  # noqa: BLE001 - a bad message must not stop the consumer
            self._bus.dead_letter(self._queue.name, item.body, item.headers)
            if isinstance(exc, SchemaError):
                log.warning("bus.dead_letter", queue=self._queue.name, reason="schema", error=str(exc))
            else:
                log.exception("bus.dead_letter", queue=self._queue.name, reason="handler_error")

    async def cancel(self) -> None:
        if self._cancelled:
            return
        self._cancelled = True
        await self._slots.cancel(self._task)
        self._bus._unsubscribed(self)


class MemoryBus(Bus):
    """One instance is shared by all services of the embedded mode."""

    durable = False

    def __init__(self, namespace: str = "") -> None:
        super().__init__(namespace)
        self._queues: dict[str, _Queue] = {}
        self._exchanges: dict[str, _Exchange] = {}
        self._subs: list[_MemorySubscription] = []
        self._connected = False

    async def connect(self) -> None:
        self._connected = True
        await self.declare_exchange(names.DLX_EXCHANGE, "fanout")
        self._queues.setdefault(self.full_name(names.DEAD_LETTER_QUEUE), _Queue(names.DEAD_LETTER_QUEUE, False))
        self._exchanges[self.full_name(names.DLX_EXCHANGE)].bindings.append(
            (self.full_name(names.DEAD_LETTER_QUEUE), "#")
        )

    async def close(self) -> None:
        for sub in list(self._subs):
            await sub.cancel()
        self._connected = False

    def _check_connected(self) -> None:
        if not self._connected:
            raise BusError("bus is not connected (call connect() first)")

    async def declare_exchange(self, name: str, kind: str = "topic") -> None:
        if kind not in ("topic", "fanout"):
            raise ValueError(f"exchange kind must be topic or fanout, not {kind!r}")
        ex = self._exchanges.setdefault(self.full_name(name), _Exchange(kind))
        if ex.kind != kind:
            raise BusError(f"exchange {name} already declared as {ex.kind}")

    async def declare_queue(
        self,
        name: str,
        *,
        durable: bool = True,
        exclusive: bool = False,
        auto_delete: bool = False,
        bindings: Iterable[tuple[str, str]] = (),
    ) -> None:
        self._check_connected()
        full = self.full_name(name)
        self._queues.setdefault(full, _Queue(full, auto_delete))
        for exchange, pattern in bindings:
            await self.declare_exchange(exchange)
            ex = self._exchanges[self.full_name(exchange)]
            if (full, pattern) not in ex.bindings:
                ex.bindings.append((full, pattern))

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
        self._check_connected()
        if not isinstance(body, (bytes, bytearray)):
            raise TypeError(f"body must be bytes, not {type(body).__name__}")
        item = Delivery(bytes(body), dict(headers or {}), props or Properties())
        if not exchange:
            queue = self._queues.get(key if verbatim else self.full_name(key))
            if queue is None:
                raise UnroutableError(f"no queue named {key!r}")
            queue.items.put_nowait(item)
            return
        ex = self._exchanges.get(self.full_name(exchange))
        if ex is None:
            raise BusError(f"no exchange named {exchange!r}")
        for qname, pattern in ex.bindings:
            if (ex.kind == "fanout" or topic_matches(pattern, key)) and qname in self._queues:
                self._queues[qname].items.put_nowait(item)

    async def consume_deliveries(self, queue: str, handler: DeliveryHandler, *, prefetch: int = 32,
                                 concurrency: int = 1) -> Subscription:
        self._check_connected()
        q = self._queues.get(self.full_name(queue))
        if q is None:
            raise BusError(f"no queue named {queue!r} (declare it first)")
        q.consumers += 1
        sub = _MemorySubscription(self, q, handler, concurrency)
        self._subs.append(sub)
        return sub

    def _unsubscribed(self, sub: _MemorySubscription) -> None:
        self._subs.remove(sub)
        q = sub._queue
        q.consumers -= 1
        if q.auto_delete and q.consumers == 0:
            self._queues.pop(q.name, None)
            for ex in self._exchanges.values():
                ex.bindings = [b for b in ex.bindings if b[0] != q.name]

    def dead_letter(self, queue: str, body: bytes, headers: Headers) -> None:
        headers = dict(headers)
        headers["x-death"] = [{"queue": queue, "reason": "rejected"}] + list(headers.get("x-death", []))
        ex = self._exchanges[self.full_name(names.DLX_EXCHANGE)]
        for qname, _ in ex.bindings:
            if qname in self._queues:
                self._queues[qname].items.put_nowait(Delivery(body, headers))

    def queue_size(self, queue: str) -> int:
        """Messages waiting in a queue (tests and introspection)."""
        return self._queues[self.full_name(queue)].items.qsize()
