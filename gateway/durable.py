"""The gateway's durable side, started with the app (cleanup_ctx): the
database, the submission queue's consumer and the Batch API's runner."""
from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import structlog
from aiohttp import web

from fastserve.gateway.app import STATE
from fastserve.gateway.batch_runner import BatchRunner
from fastserve.gateway.db import open_database
from fastserve.gateway.store import BatchStore, RequestStore
from fastserve.gateway.submissions import SubmissionQueue

log = structlog.get_logger("fastserve.gateway")


async def durable_work(app: web.Application) -> AsyncIterator[None]:
    state = app[STATE]
    engine = await open_database(state.config.database)
    requests = RequestStore(engine)
    state.batches = BatchStore(engine)
    state.batch_runner = BatchRunner(state.bus, state.batches, requests,
                                     result_retention=state.config.result_retention)
    state.queue = SubmissionQueue(state, requests)
    await state.batch_runner.start()
    await state.queue.start()
    sweeper = asyncio.create_task(state.batch_runner.run_sweeper(), name="gateway-batch-sweeper")
    log.info("gateway.queue_started", database=engine.url.render_as_string(hide_password=True),
             concurrency=state.config.queue_concurrency)
    try:
        yield
    finally:
        sweeper.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sweeper
        await state.queue.stop()
        await state.batch_runner.stop()
        await engine.dispose()
