"""RabbitMQ bus through aio-pika (semantics in fastserve.common.bus).

One robust connection per bus (named, so the management UI shows who is who),
one publishing channel with publisher confirms, and one channel per
subscription so that each has its own prefetch (basic.qos is per channel).
Handlers must be idempotent: after a reconnect the broker redelivers what was
prefetched but not acked.
"""
from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterable
from datetime import datetime, timezone
from typing import Any

import aio_pika
import structlog
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractQueue, AbstractRobustConnection
from aio_pika.exceptions import ChannelInvalidStateError, DeliveryError

from fastserve.common import names
from fastserve.common.bus import (
    MSGPACK, Bus, BusError, Delivery, DeliveryHandler, Headers, Properties, Subscription, UnroutableError,
    _HandlerSlots, _fresh_log_context,
)
from fastserve.common.schemas import SchemaError

log = structlog.get_logger("fastserve.bus")

_KINDS = {"topic": aio_pika.ExchangeType.TOPIC, "fanout": aio_pika.ExchangeType.FANOUT}


class _RabbitSubscription(Subscription):
    def __init__(self, channel: AbstractChannel, queue: AbstractQueue, handler: DeliveryHandler,
                 concurrency: int = 1) -> None:
        self._channel, self._queue, self._handler = channel, queue, handler
        self._log_context = structlog.contextvars.get_contextvars()
        self._inbox: asyncio.Queue[AbstractIncomingMessage] = asyncio.Queue()
        self._tag: str | None = None
        self._task: asyncio.Task | None = None
        self._slots = _HandlerSlots(concurrency)
        self._cancelled = False

    async def start(self) -> None:
        # aio-pika runs each delivery callback as its own task; queueing them
        # here (in delivery order) and handling them in one loop keeps order.
        async def on_message(msg: AbstractIncomingMessage) -> None:
            self._inbox.put_nowait(msg)

        self._tag = await self._queue.consume(on_message)
        self._task = asyncio.create_task(self._run(), name=f"consume:{self._queue.name}")

    async def _run(self) -> None:
        while True:
            msg = await self._inbox.get()  # the broker's prefetch bounds what waits here
            await self._slots.acquire()
            await self._slots.run(self._handle, msg, f"handle:{self._queue.name}")

    async def _handle(self, msg: AbstractIncomingMessage) -> None:
        _fresh_log_context(self._log_context)
        try:
            async with msg.process(requeue=False, ignore_processed=True):
                try:
                    await self._handler(Delivery(msg.body, dict(msg.headers or {}), _properties(msg)))
                except asyncio.CancelledError:
                    with contextlib.suppress(Exception):
                        await msg.nack(requeue=True)
                    raise
        except asyncio.CancelledError:
            raise
        except ChannelInvalidStateError:
            log.warning("bus.ack_lost", queue=self._queue.name, note="channel reopened; broker redelivers")
        except SchemaError as exc:
            log.warning("bus.dead_letter", queue=self._queue.name, reason="schema", error=str(exc))
        except Exception:  # noqa: BLE001 - a bad message must not stop the consumer
            log.exception("bus.dead_letter", queue=self._queue.name, reason="handler_error")

    async def cancel(self) -> None:
        if self._cancelled:
            return
        self._cancelled = True
        with contextlib.suppress(Exception):
            if self._tag is not None:
                await self._queue.cancel(self._tag)
        await self._slots.cancel(self._task)
        # Closing the channel returns every prefetched, unacked message to the queue.
        with contextlib.suppress(Exception):
            await self._channel.close()


def _properties(msg: AbstractIncomingMessage) -> Properties:
    ts = msg.timestamp
    return Properties(content_type=msg.content_type or MSGPACK, reply_to=msg.reply_to,
                      correlation_id=msg.correlation_id,
                      expiration=float(msg.expiration) if msg.expiration is not None else None,
                      timestamp=ts.timestamp() if isinstance(ts, datetime) else ts, redelivered=bool(msg.redelivered))


class RabbitBus(Bus):
    def __init__(
        self,
        url: str,
        *,
        namespace: str = "",
        connection_name: str = "fastserve",
        confirm_timeout: float = 10.0,
        reconnect_interval: float = 1.0,
    ) -> None:
        super().__init__(namespace)
        self.url = url
        self.connection_name = connection_name
        self.confirm_timeout = confirm_timeout
        self.reconnect_interval = reconnect_interval
        self._conn: AbstractRobustConnection | None = None
        self._channel: AbstractChannel | None = None
        self._exchanges: dict[str, Any] = {}
        self._queue_specs: dict[str, dict[str, Any]] = {}
        self._bindings: dict[str, list[tuple[str, str]]] = {}
        self._subs: list[_RabbitSubscription] = []

    async def connect(self) -> None:
        self._conn = await aio_pika.connect_robust(
            self.url, client_properties={"connection_name": self.connection_name},
            reconnect_interval=self.reconnect_interval,
        )
        self._channel = await self._conn.channel(publisher_confirms=True, on_return_raises=True)
        await self.declare_exchange(names.DLX_EXCHANGE, "fanout")
        dlq = await self._channel.declare_queue(self.full_name(names.DEAD_LETTER_QUEUE), durable=True)
        await dlq.bind(self._exchanges[self.full_name(names.DLX_EXCHANGE)], routing_key="#")

    async def close(self) -> None:
        for sub in list(self._subs):
            await sub.cancel()
        self._subs.clear()
        if self._conn is not None:
            await self._conn.close()
            self._conn = self._channel = None

    def _ch(self) -> AbstractChannel:
        if self._channel is None:
            raise BusError("bus is not connected (call connect() first)")
        return self._channel

    async def declare_exchange(self, name: str, kind: str = "topic") -> None:
        if kind not in _KINDS:
            raise ValueError(f"exchange kind must be topic or fanout, not {kind!r}")
        full = self.full_name(name)
        if full not in self._exchanges:
            self._exchanges[full] = await self._ch().declare_exchange(full, _KINDS[kind], durable=True)

    async def declare_queue(
        self,
        name: str,
        *,
        durable: bool = True,
        exclusive: bool = False,
        auto_delete: bool = False,
        bindings: Iterable[tuple[str, str]] = (),
    ) -> None:
        full = self.full_name(name)
        spec = dict(
            name=full,
            durable=durable,
            exclusive=exclusive,
            auto_delete=auto_delete,
            arguments={"x-dead-letter-exchange": self.full_name(names.DLX_EXCHANGE)},
        )
        queue = await self._ch().declare_queue(**spec)
        self._queue_specs[full] = spec
        for exchange, pattern in bindings:
            await self.declare_exchange(exchange)
            await queue.bind(self._exchanges[self.full_name(exchange)], routing_key=pattern)
            self._bindings.setdefault(full, []).append((self.full_name(exchange), pattern))

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
        ch = self._ch()
        p = props or Properties()
        msg = aio_pika.Message(
            bytes(body),
            headers=headers or None,
            content_type=p.content_type,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT if persistent else aio_pika.DeliveryMode.NOT_PERSISTENT,
            reply_to=p.reply_to,
            correlation_id=p.correlation_id,
            expiration=p.expiration,
            timestamp=datetime.fromtimestamp(p.timestamp, timezone.utc) if p.timestamp is not None else None,
        )
        if exchange:
            full = self.full_name(exchange)
            target = self._exchanges.get(full)
            if target is None:
                target = await ch.get_exchange(full, ensure=True)
                self._exchanges[full] = target
            await target.publish(msg, routing_key=key, mandatory=False, timeout=self.confirm_timeout)
            return
        try:
            await ch.default_exchange.publish(
                msg, routing_key=key if verbatim else self.full_name(key), mandatory=True, timeout=self.confirm_timeout
            )
        except DeliveryError as exc:
            raise UnroutableError(f"no queue named {key!r}") from exc

    async def consume_deliveries(self, queue: str, handler: DeliveryHandler, *, prefetch: int = 32,
                                 concurrency: int = 1) -> Subscription:
        if self._conn is None:
            raise BusError("bus is not connected (call connect() first)")
        full = self.full_name(queue)
        channel = await self._conn.channel(publisher_confirms=False)
        await channel.set_qos(prefetch_count=prefetch)
        spec = self._queue_specs.get(full)
        # Declared here (not only looked up) so the robust channel re-declares it after a reconnect.
        q = await (channel.declare_queue(**spec) if spec else channel.declare_queue(full, passive=True))
        for exchange, pattern in self._bindings.get(full, []):
            await q.bind(exchange, routing_key=pattern)
        sub = _RabbitSubscription(channel, q, handler, concurrency)
        await sub.start()
        self._subs.append(sub)
        return sub

    async def delete_declared(self) -> None:
        """Delete every queue and exchange this bus declared (test teardown)."""
        for sub in list(self._subs):
            await sub.cancel()
        self._subs.clear()
        ch = self._ch()
        for full in [*self._queue_specs, self.full_name(names.DEAD_LETTER_QUEUE)]:
            with contextlib.suppress(Exception):
                await ch.queue_delete(full)
        for full in self._exchanges:
            with contextlib.suppress(Exception):
                await ch.exchange_delete(full)
