"""The public submission queue (docs/queue.md): requests that come by
RabbitMQ instead of HTTP, each answered with one SubmitResult on the reply
queue its sender names.

Every gateway consumes names.SUBMIT_QUEUE, up to `queue_concurrency`
requests at once; the rest wait in the broker. Consuming it here, not in a
service of its own, gives a queued request what an HTTP one has: the same
validation and tokenization, stop strings and detokenization, the deadline,
and the continuation of its jobs when a scheduler dies (JobTracker). A
message is acked only once its result is stored and sent, so a gateway that
dies leaves its requests to another one.

The client's request id makes a submission idempotent (RequestStore): the
first message with an id claims it in the database; a message whose id ran
gets the stored result again; a duplicate of one running elsewhere is
dropped (the running one answers). Redelivery (the consumer that had it went
away) takes the claim over, and only the claim's owner may store a result,
so an id is answered once even when two gateways ran it.
"""
from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable
from contextlib import aclosing
from typing import TypeVar

import orjson
import structlog
from sqlalchemy.exc import InterfaceError, OperationalError

from fastserve.common import names
from fastserve.common.bus import JSON, Delivery, Properties, Subscription, UnroutableError
from fastserve.common.schemas import (
    PRIORITY_INTERACTIVE, RequestTokens, SchemaError, SubmitRequest, SubmitResult, Timings, decode, decode_json, encode, encode_json, peek,
)
from fastserve.gateway.app import GatewayState
from fastserve.gateway.errors import APIError, bad
from fastserve.gateway.protocol import parse_chat, parse_completion
from fastserve.gateway.serving import (
    Timing, choice_events, error_from_event, observe_finished, plan_choices, response_body, response_id,
)
from fastserve.gateway.store import RequestStore

log = structlog.get_logger("fastserve.gateway.queue")
T = TypeVar("T")

REASON_HEADER = "x-fastserve-reason"
STOP_GRACE = 10.0  # seconds a stopping gateway waits for results being stored and sent


class SubmissionQueue:
    def __init__(self, state: GatewayState, store: RequestStore) -> None:
        self.state = state
        self.store = store
        self._sub: Subscription | None = None

    async def start(self) -> None:
        bus = self.state.bus
        await bus.declare_queue(names.SUBMIT_QUEUE, durable=True)
        n = self.state.config.queue_concurrency
        if n:
            self._sub = await bus.consume_deliveries(names.SUBMIT_QUEUE, self.handle, prefetch=n, concurrency=n)

    async def stop(self) -> None:
        """Requests still running go back to the queue for another gateway."""
        if self._sub is not None:
            await self._sub.cancel()

    async def handle(self, d: Delivery) -> None:
        taken = time.time()
        try:
            req = decode_json(d.body, SubmitRequest) if d.props.content_type == JSON else decode(d.body, SubmitRequest)
            if not d.props.reply_to:
                raise SchemaError("no reply_to property: the result would have nowhere to go")
        except SchemaError as exc:
            await self._refuse(d, str(exc))
            return
        owner = f"{self.state.config.instance_id}:{uuid.uuid4().hex[:12]}"
        claim = await persist(lambda: self.store.claim(req.request_id, owner, d.props.redelivered))
        if claim.action == "done":
            await self._reply(d, req.request_id, decode(claim.result, SubmitResult))
            return
        if claim.action != "run":
            log.info("queue.duplicate_dropped", request_id=req.request_id, state=claim.action)
            return
        result = await self.run(req, d, taken)
        # Stored and sent even when this gateway stops meanwhile: the message is
        # then acked, not given to another gateway to be answered twice.
        tail = asyncio.ensure_future(self._complete(d, req.request_id, owner, result))
        try:
            await asyncio.shield(tail)
        except asyncio.CancelledError:
            await asyncio.wait_for(tail, STOP_GRACE)  # past it, cancelled: redelivered after all

    async def _complete(self, d: Delivery, request_id: str, owner: str, result: SubmitResult) -> None:
        if await persist(lambda: self.store.finish(request_id, owner, encode(result))):
            await self._reply(d, request_id, result)
        else:
            log.info("queue.result_dropped", request_id=request_id, note="claim taken over or cancelled")

    async def run(self, req: SubmitRequest, d: Delivery, taken: float) -> SubmitResult:
        """What POST req.url with req.body would have answered, as a SubmitResult."""
        state = self.state
        start = d.props.timestamp or taken
        deadline = start + d.props.expiration if d.props.expiration is not None else taken + \
            state.config.queue_timeout
        queued = max(0.0, taken - start)
        arrival = time.monotonic()
        try:
            if time.time() >= deadline:
                raise APIError(504, "the request's deadline (its message's expiration) passed before it ran",
                               "timeout", None, "timeout")
            if req.body.get("priority", req.priority) != req.priority:
                raise bad("the message's 'priority' field decides on the queue; the body's differs", "priority")
            if req.body.get("stream") is not None:
                raise bad("'stream' is not available on the queue; ask for token events with 'tokens'", "stream")
            parse = parse_completion if req.url == "/v1/completions" else parse_chat
            greq = await asyncio.to_thread(parse, req.body, state.config, state.model,
                                           state.tracker.max_model_len(state.model.max_model_len))
            request_id = response_id(greq)
            choices, jobs = plan_choices(state, greq, request_id)
            timing = Timing(arrival, len(choices), interactive=req.priority == PRIORITY_INTERACTIVE)
            sub = await state.tracker.submit(req.request_id, jobs, priority=req.priority, deadline=deadline)
            sent = [0] * len(choices)  # token ids already sent as RequestTokens, per choice
            try:
                async with aclosing(choice_events(None, state, sub, choices, timing)) as events:
                    async for c, delta in events:
                        if c.error is not None:
                            raise error_from_event(c)
                        if req.tokens and (delta.text or len(c.token_ids) > sent[c.index]):
                            new, sent[c.index] = c.token_ids[sent[c.index]:], len(c.token_ids)
                            await self._send(d, RequestTokens(req.request_id, c.index, delta.text, new))
            finally:
                state.tracker.release(sub, reason="request ended")
            body, returned = response_body(state, greq, choices, request_id)
            observe_finished(state, greq, returned, timing, queued)
        except APIError as err:
            state.metrics.observe_error(err.status)
            return SubmitResult(req.request_id, err.status, error=err.body()["error"],
                                timings=Timings(queued, time.monotonic() - arrival))
        except Exception as exc:  # noqa: BLE001 - the sender gets a 500 result, the log the traceback
            log.exception("queue.request_failed", request_id=req.request_id)
            state.metrics.observe_error(500)
            return SubmitResult(req.request_id, 500, error={
                "message": f"Internal error: {type(exc).__name__}: {exc}", "type": "server_error", "param": None,
                "code": "internal_error"}, timings=Timings(queued, time.monotonic() - arrival))
        first = timing.first - arrival if timing.first is not None else None
        return SubmitResult(req.request_id, 200, response=body, token_ids=[c.token_ids for c in returned],
                            timings=Timings(queued, time.monotonic() - arrival, first))

    async def _reply(self, d: Delivery, request_id: str, result: SubmitResult) -> None:
        try:
            await self._send(d, result)
        except UnroutableError:
            log.warning("queue.reply_queue_gone", request_id=request_id, reply_to=d.props.reply_to,
                        note="the result is kept: submit the same id again to get it")

    async def _send(self, d: Delivery, msg: SubmitResult | RequestTokens) -> None:
        as_json = d.props.content_type == JSON
        await self.state.bus.publish(d.props.reply_to, encode_json(msg) if as_json else encode(msg), persistent=True,
                                     props=Properties(content_type=d.props.content_type,
                                                      correlation_id=msg.request_id), verbatim=True)

    async def _refuse(self, d: Delivery, reason: str) -> None:
        """A malformed message: to the dead-letter queue with the reason, and
        the reason to its sender when its request id and reply queue can be read."""
        log.warning("queue.malformed", reason=reason)
        await self.state.bus.publish(names.DEAD_LETTER_QUEUE, d.body, {
            **d.headers, REASON_HEADER: reason, "x-fastserve-queue": names.SUBMIT_QUEUE}, persistent=True,
            props=Properties(content_type=d.props.content_type, reply_to=d.props.reply_to,
                             correlation_id=d.props.correlation_id))
        request_id = _readable_id(d)
        if request_id and d.props.reply_to:
            error = {"message": f"malformed request: {reason}", "type": "invalid_request_error", "param": None,
                     "code": "malformed_message"}
            await self._reply(d, request_id, SubmitResult(request_id, 400, error=error))


async def persist(op: Callable[[], Awaitable[T]]) -> T:
    """A database step, tried again until it succeeds: while the database is
    away the request waits (its message unacked), it is not dead-lettered."""
    delay = 0.1
    while True:
        try:
            return await op()
        except (OSError, TimeoutError, OperationalError, InterfaceError) as exc:  # unreachable, locked, gone
            log.warning("queue.database_unavailable", error=str(exc), retry_in=delay)
            await asyncio.sleep(delay)
            delay = min(2 * delay, 5.0)


def _readable_id(d: Delivery) -> str | None:
    if d.props.content_type == JSON:
        try:
            raw = orjson.loads(d.body)
        except orjson.JSONDecodeError:
            return None
        rid = raw.get("request_id") if isinstance(raw, dict) else None
        return rid if isinstance(rid, str) and rid else None
    return peek(d.body, "request_id").get("request_id")
