"""A fake backend for gateway tests: an "echo scheduler" on the bus that
answers each JobSubmit with TokenEvents (the prompt's tokens, cycled), honours
max_tokens, stop_token_ids and JobCancel, and sends scheduler/worker heartbeats."""
from __future__ import annotations

import asyncio
import contextlib
import time

from aiohttp.test_utils import TestClient, TestServer

from fastserve.common import names
from fastserve.common.schemas import (
    Heartbeat, JobCancel, JobSubmit, SchedulerStats, TokenBatch, TokenEvent, TopLogprob, decode, encode,
)
from fastserve.gateway.app import create_app
from fastserve.gateway.config import GatewayConfig


class EchoScheduler:
    """Output token k of a job is its original prompt's token k (cycled), also
    for a continuation (which starts at k = num_generated). `die_after`: stop
    (no more tokens, no more heartbeats) after sending that many tokens."""

    def __init__(self, bus, *, token_delay: float = 0.0, tokens_per_event: int = 1, heartbeats: bool = True,
                 error: str | None = None, max_queued_jobs: int = 0, num_waiting: int = 0,
                 name: str = "echo", die_after: int | None = None) -> None:
        self.bus = bus
        self.name = name
        self.die_after = die_after
        self.sent_tokens = 0
        self.dead = asyncio.Event()
        self.token_delay = token_delay
        self.tokens_per_event = tokens_per_event
        self.heartbeats = heartbeats
        self.error = error
        self.max_queued_jobs, self.num_waiting = max_queued_jobs, num_waiting
        self.submitted: list[JobSubmit] = []
        self.cancelled: list[str] = []
        self.cancel_event = asyncio.Event()
        self._jobs: dict[str, asyncio.Task] = {}
        self._subs = []
        self._hb: asyncio.Task | None = None

    async def start(self) -> None:
        await self.bus.declare_queue(names.JOB_QUEUE, durable=True)
        await self.bus.declare_queue(names.control_queue(self.name), durable=False, exclusive=True, auto_delete=True,
                                     bindings=[(names.CONTROL_EXCHANGE, names.CANCEL_KEY)])
        await self.bus.declare_exchange(names.EVENTS_EXCHANGE)
        self._subs.append(await self.bus.consume(names.JOB_QUEUE, self._on_job))
        self._subs.append(await self.bus.consume(names.control_queue(self.name), self._on_cancel))
        if self.heartbeats:
            await self.beat()
            self._hb = asyncio.create_task(self._beat_forever())

    async def stop(self) -> None:
        if self._hb:
            self._hb.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._hb
        for sub in self._subs:
            await sub.cancel()
        for t in self._jobs.values():
            t.cancel()
        await asyncio.gather(*self._jobs.values(), return_exceptions=True)

    async def beat(self) -> None:
        now = time.time()
        for service in ("scheduler", "worker"):
            await self.bus.publish(names.heartbeat_key(service, self.name),
                                   encode(Heartbeat(service, self.name, now)), exchange=names.EVENTS_EXCHANGE)
        stats = SchedulerStats(self.name, now, model="m", queue_lengths=[len(self._jobs)], num_running=len(self._jobs),
                               num_waiting=self.num_waiting, max_queued_jobs=self.max_queued_jobs)
        await self.bus.publish(names.stats_key(self.name), encode(stats), exchange=names.EVENTS_EXCHANGE)

    async def _beat_forever(self) -> None:
        while True:
            await asyncio.sleep(0.2)
            await self.beat()

    async def _on_job(self, body: bytes, headers: dict) -> None:
        job = decode(body, JobSubmit)
        self.submitted.append(job)
        self._jobs[job.job_id] = asyncio.create_task(self._run(job))

    async def _on_cancel(self, body: bytes, headers: dict) -> None:
        msg = decode(body, JobCancel)
        self.cancelled.append(msg.job_id)
        self.cancel_event.set()
        task = self._jobs.pop(msg.job_id, None)
        if task:
            task.cancel()

    async def _run(self, job: JobSubmit) -> None:
        s = job.sampling
        prompt = job.prompt_token_ids[:job.prompt_len]
        if self.error:
            await self._send(job, TokenEvent(job.job_id, [], error=self.error))
            return
        out: list[int] = list(job.prompt_token_ids[job.prompt_len:])  # a continuation's tokens so far
        pending: list[int] = []
        first = True
        await self._send(job, TokenEvent(job.job_id, [], num_prompt_tokens=len(prompt)))  # "I hold it"
        while True:
            if self.die_after is not None and self.sent_tokens >= self.die_after:
                await self._die()
                return
            tok = prompt[len(out) % len(prompt)]
            out.append(tok)
            pending.append(tok)
            finish = None
            if tok in s.stop_token_ids:
                finish = "stop"
            elif len(out) >= s.max_tokens:
                finish = "length"
            if finish or len(pending) >= self.tokens_per_event:
                k = s.logprobs
                ev = TokenEvent(
                    job.job_id, pending,
                    logprobs=[-0.5] * len(pending) if k is not None else None,
                    top_logprobs=[[TopLogprob(t, -0.5), TopLogprob((t + 1) % 1000, -1.5)][:k] for t in pending]
                    if k else None,
                    finish_reason=finish, num_prompt_tokens=len(prompt), num_generated=len(out),
                    queue_time=0.001 if first else None)
                first = False
                pending = []
                self.sent_tokens += len(ev.token_ids)
                await self._send(job, ev)
            if finish:
                self._jobs.pop(job.job_id, None)
                return
            if self.token_delay:
                await asyncio.sleep(self.token_delay)

    async def _send(self, job: JobSubmit, ev: TokenEvent) -> None:
        await self.bus.publish(job.reply_to, encode(TokenBatch(self.name, [ev])))

    async def _die(self) -> None:
        """Like a SIGKILL: silence, and the jobs it holds are lost with it."""
        self.dead.set()
        if self._hb:
            self._hb.cancel()
        for sub in self._subs:
            await sub.cancel()


@contextlib.asynccontextmanager
async def gateway(bus, model_dir, *, echo: EchoScheduler | None = None, **config):
    """Yields (aiohttp TestClient, EchoScheduler or None)."""
    cfg = GatewayConfig(model=str(model_dir), served_model_name=config.pop("served_model_name", "tiny"), **config)
    app = create_app(cfg, bus)
    client = TestClient(TestServer(app, handler_cancellation=True))
    await client.start_server()
    if echo is not None:
        await echo.start()
        if echo.heartbeats:  # wait until the gateway has heard the backend
            for _ in range(100):
                if (await client.get("/health")).status == 200:
                    break
                await asyncio.sleep(0.05)
            else:
                raise AssertionError("the gateway never saw the echo scheduler's heartbeat")
    try:
        yield client, echo
    finally:
        await client.close()
        if echo is not None:
            await echo.stop()
