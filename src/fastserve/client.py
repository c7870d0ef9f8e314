"""fastserve.client: submit requests through RabbitMQ and collect their
results as they finish (the public submission queue, docs/queue.md).

    import asyncio
    from fastserve.client import Client

    async def main():
        async with Client("amqp://guest:guest@127.0.0.1:5672/", reply_queue="my-results") as client:
            for i in range(100):
                await client.submit(f"q-{i}", "/v1/completions",
                                    {"model": "llama-small-random", "prompt": f"Question {i}:", "max_tokens": 32})
            async for result in client.results():
                print(result.request_id, result.status, result.text)

    asyncio.run(main())

Request ids are the client's own and idempotent: an id that ran is never run
again, its stored result is sent again. So a program that crashed resumes by
submitting the ids it has no result for; with a named reply queue (durable),
results that finished meanwhile are waiting there. `results()` yields each
submitted id once, and acks a result only when the loop asks for the next
one: a crash in the loop's body loses nothing.

A library for users: it speaks the wire format (fastserve.common) and
imports none of the services.
"""
from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from typing import Any

import aio_pika
from aio_pika.abc import AbstractIncomingMessage

from fastserve.common import names
from fastserve.common.schemas import (
    PRIORITY_BATCH, RequestTokens, SchemaError, SubmitRequest, SubmitResult, decode, encode,
)

__all__ = ["Client", "Result"]


@dataclass
class Result:
    """One request's outcome: `response` is what the REST endpoint would have answered."""

    request_id: str
    status: int
    response: dict | None
    error: dict | None
    token_ids: list[list[int]]  # per choice
    timings: dict | None  # {"queued", "first_token", "total"} seconds; None for an expiry noticed here

    @property
    def ok(self) -> bool:
        return self.status == 200

    @property
    def texts(self) -> list[str]:
        out = []
        for c in (self.response or {}).get("choices", []):
            out.append(c["text"] if "text" in c else (c.get("message") or {}).get("content") or "")
        return out

    @property
    def text(self) -> str | None:
        return self.texts[0] if self.texts else None

    @property
    def finish_reason(self) -> str | None:
        choices = (self.response or {}).get("choices") or [{}]
        return choices[0].get("finish_reason")

    @property
    def usage(self) -> dict | None:
        return (self.response or {}).get("usage")

    @classmethod
    def from_message(cls, msg: SubmitResult) -> Result:
        t = msg.timings
        timings = None if t is None else {"queued": t.queued, "first_token": t.first_token, "total": t.total}
        return cls(msg.request_id, msg.status, msg.response, msg.error, msg.token_ids, timings)


class Client:
    """reply_queue: a name makes a durable queue that keeps results while this
    program is down (resume by submitting the ids without a result); None, a
    private queue that goes with the connection. namespace: the deployment's
    --namespace."""

    def __init__(self, url: str, *, reply_queue: str | None = None, namespace: str = "",
                 expiry_grace: float = 10.0) -> None:
        self.url = url
        self.namespace = namespace
        self.reply_queue_name = reply_queue
        self.expiry_grace = expiry_grace
        self._conn: aio_pika.abc.AbstractRobustConnection | None = None
        self._channel: aio_pika.abc.AbstractChannel | None = None
        self._reply: aio_pika.abc.AbstractQueue | None = None
        self._inbox: asyncio.Queue[AbstractIncomingMessage] = asyncio.Queue()
        self._pending: dict[str, float | None] = {}  # request id -> deadline (time.time()) or None
        self.duplicates = 0  # results for ids that already had one (or were never submitted here): dropped

    def _full(self, name: str) -> str:
        return f"{self.namespace}.{name}" if self.namespace else name

    async def __aenter__(self) -> Client:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def connect(self) -> None:
        self._conn = await aio_pika.connect_robust(self.url, client_properties={"connection_name": "fastserve-client"})
        self._channel = await self._conn.channel(publisher_confirms=True)
        await self._channel.set_qos(prefetch_count=256)
        if self.reply_queue_name:
            self._reply = await self._channel.declare_queue(self.reply_queue_name, durable=True)
        else:
            self._reply = await self._channel.declare_queue(exclusive=True, auto_delete=True)
        await self._reply.consume(self._inbox.put)

    async def close(self) -> None:
        if self._conn is not None:
            await self._conn.close()
            self._conn = None

    async def delete_reply_queue(self) -> None:
        """Remove the named reply queue (all its results are in)."""
        await self._reply.delete(if_unused=False, if_empty=False)

    @property
    def pending(self) -> set[str]:
        """Submitted ids without a result yet."""
        return set(self._pending)

    async def submit(self, request_id: str, url: str, body: dict, *, priority: int = PRIORITY_BATCH,
                     expiration: float | None = None, tokens: bool = False) -> None:
        """Queue one request. expiration: seconds from now after which nobody
        waits for it (queued or running, it then ends with status 504).
        tokens: RequestTokens messages come before the result (see messages())."""
        msg = SubmitRequest(request_id, url, body, priority=priority, tokens=tokens)
        now = time.time()
        self._pending[request_id] = now + expiration if expiration is not None else None
        await self._publish(msg, expiration, now)

    async def _publish(self, msg: SubmitRequest, expiration: float | None, now: float) -> None:
        await self._channel.default_exchange.publish(aio_pika.Message(
            encode(msg), content_type="application/msgpack", delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            reply_to=self._reply.name, correlation_id=msg.request_id, expiration=expiration,
            timestamp=now), routing_key=self._full(names.SUBMIT_QUEUE), mandatory=True)

    async def submit_many(self, requests: Iterable[tuple[str, str, dict]], *, concurrency: int = 64,
                          **options: Any) -> int:
        """Queue (request_id, url, body) triples, `concurrency` publishes in flight; how many were sent."""
        slots = asyncio.Semaphore(concurrency)
        tasks = []

        async def one(rid: str, url: str, body: dict) -> None:
            try:
                await self.submit(rid, url, body, **options)
            finally:
                slots.release()

        for rid, url, body in requests:
            await slots.acquire()
            tasks.append(asyncio.ensure_future(one(rid, url, body)))
        await asyncio.gather(*tasks)
        return len(tasks)

    async def messages(self) -> AsyncIterator[Result | RequestTokens]:
        """Token events (of requests that asked for them) and results, as they
        come, until every submitted id has its result."""
        while self._pending:
            try:
                incoming = await asyncio.wait_for(self._inbox.get(), self._wait())
            except asyncio.TimeoutError:
                for rid in self._expired():
                    yield Result(rid, 504, None, {"message": "no result before the request's expiration: it "
                                                  "expired in the queue", "type": "timeout", "param": None,
                                 "code": "expired"}, [], None)
                continue
            try:
                msg = decode(incoming.body, (SubmitResult, RequestTokens))
            except SchemaError:
                await incoming.reject()  # not ours to read: the queue's dead-letter policy decides
                continue
            if isinstance(msg, RequestTokens):
                if msg.request_id in self._pending:
                    yield msg
            elif self._pending.pop(msg.request_id, False) is not False:
                yield Result.from_message(msg)
            else:
                self.duplicates += 1
            # Acked once the caller asked for more: a crash while handling it leaves it in the queue.
            await incoming.ack()

    async def results(self) -> AsyncIterator[Result]:
        """One Result per submitted id, in the order they finish."""
        async for msg in self.messages():
            if isinstance(msg, Result):
                yield msg

    def _wait(self) -> float | None:
        deadlines = [d for d in self._pending.values() if d is not None]
        return max(0.0, min(deadlines) + self.expiry_grace - time.time()) if deadlines else None

    def _expired(self) -> list[str]:
        now = time.time()
        gone = [r for r, d in self._pending.items() if d is not None and now >= d + self.expiry_grace]
        for r in gone:
            del self._pending[r]
        return gone
