"""OpenAI's Batch API behind the HTTP handlers (gateway/batch_api.py): a
batch's lines run as requests of the submission queue (priority batch,
expiring with the batch), their results come back on the durable
names.BATCH_RESULTS_QUEUE, which every gateway consumes, and are recorded per
line in the database. A batch ends (completed, cancelled, expired) when a
gateway's sweeper sees it is due and writes its output and error files; the
move to the final status is conditional, so one gateway does it.

State lives in the database, work in the broker: a gateway may restart at
any time. Lines sent while no gateway ran are still queued (RabbitMQ); on the
in-memory bus, a restarted gateway sends the unfinished lines again (their
request ids make that idempotent). A batch left `validating` (its gateway died
while sending its lines) is sent again by any gateway's sweeper.
"""
from __future__ import annotations

import asyncio
import time
import uuid

import structlog

from fastserve.common import names
from fastserve.common.batch_format import dumps_line, error_line, parse_line, result_line
from fastserve.common.bus import Bus, Properties, Subscription
from fastserve.common.schemas import PRIORITY_BATCH, SubmitRequest, SubmitResult, decode, encode
from fastserve.gateway.store import BatchStore, RequestStore
from fastserve.gateway.submissions import persist

log = structlog.get_logger("fastserve.gateway.batch")

SEND_CONCURRENCY = 64  # publishes of one batch's lines in flight at once
RESEND_AFTER = 60.0  # seconds a batch may stay `validating` before another gateway sends it
PURGE_INTERVAL = 600.0  # seconds between purges of old results


def line_request_id(batch_id: str, idx: int) -> str:
    return f"{batch_id}-{idx}"


class BatchRunner:
    def __init__(self, bus: Bus, batches: BatchStore, requests: RequestStore, *, result_retention: float,
                 sweep_interval: float = 1.0) -> None:
        self.bus = bus
        self.batches = batches
        self.requests = requests
        self.result_retention = result_retention
        self.sweep_interval = sweep_interval
        self._sub: Subscription | None = None
        self._wake = asyncio.Event()

    async def start(self) -> None:
        await self.bus.declare_queue(names.BATCH_RESULTS_QUEUE, durable=True)
        await self.bus.declare_queue(names.SUBMIT_QUEUE, durable=True)
        if not self.bus.durable:
            for batch_id in await self.batches.ids_in(("validating", "in_progress")):
                await self.send(batch_id)
        self._sub = await self.bus.consume(names.BATCH_RESULTS_QUEUE, self._on_result, prefetch=64)

    async def stop(self) -> None:
        if self._sub is not None:
            await self._sub.cancel()

    # ------------------------------------------------------------ lines out
    async def send(self, batch_id: str) -> None:
        """Queue the batch's unfinished lines; then it is in progress."""
        batch = await self.batches.get(batch_id)
        content = await self.batches.file_content(batch["input_file_id"])
        pending = await self.batches.pending_lines(batch_id)  # in line order
        lines = await asyncio.to_thread(content.splitlines)  # a file may be large: not on the event loop
        expires = batch["expires_at"]
        todo = iter(pending)

        async def sender() -> None:
            # SEND_CONCURRENCY of these share the iterator: that many publishes in flight, no task per line.
            for idx in todo:
                line = parse_line(idx, lines[idx], batch["endpoint"])
                msg = SubmitRequest(line_request_id(batch_id, idx), line.url, line.body, priority=PRIORITY_BATCH)
                await self.bus.publish(names.SUBMIT_QUEUE, encode(msg), persistent=True, props=Properties(
                    reply_to=self.bus.full_name(names.BATCH_RESULTS_QUEUE), correlation_id=msg.request_id,
                    timestamp=time.time(), expiration=max(1.0, expires - time.time())))

        await asyncio.gather(*(sender() for _ in range(SEND_CONCURRENCY)))
        await self.batches.move(batch_id, ("validating",), "in_progress", in_progress_at=int(time.time()))
        log.info("batch.sent", batch_id=batch_id, lines=len(pending))

    async def _on_result(self, body: bytes, headers: dict) -> None:
        result = decode(body, SubmitResult)
        batch_id, _, idx = result.request_id.rpartition("-")
        custom_id = await persist(lambda: self.batches.custom_id(batch_id, int(idx)))
        if custom_id is None:
            log.warning("batch.result_for_unknown_line", request_id=result.request_id)
            return
        row = await persist(lambda: self.batches.record(batch_id, int(idx), result.status == 200,
                                                        dumps_line(result_line(custom_id, result))))
        if row is not None and row["completed"] + row["failed"] >= row["total"]:
            self._wake.set()

    # ------------------------------------------------------------ endings
    async def cancel(self, batch_id: str) -> bool:
        ok = await self.batches.move(batch_id, ("validating", "in_progress"), "cancelling",
                                     cancelling_at=int(time.time()))
        if ok:
            pending = await self.batches.pending_lines(batch_id)
            await self.requests.cancel([line_request_id(batch_id, i) for i in pending])
            self._wake.set()
        return ok

    async def run_sweeper(self) -> None:
        """Background task: end the batches that are due; now and then, forget
        the queue's results older than the retention."""
        purged = 0.0
        while True:
            try:
                await self.sweep()
                if time.monotonic() - purged > PURGE_INTERVAL:
                    purged = time.monotonic()
                    n = await self.requests.purge(time.time() - self.result_retention)
                    if n:
                        log.info("queue.results_purged", count=n)
            except Exception:  # noqa: BLE001 - the database may be away for a moment: try again
                log.exception("batch.sweep_failed")
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), self.sweep_interval)
            except asyncio.TimeoutError:
                pass

    async def sweep(self) -> None:
        now = time.time()
        for batch_id in await self.batches.ids_in(("validating", "in_progress", "cancelling")):
            b = await self.batches.get(batch_id)
            if b["status"] == "cancelling":
                await self._end(b, "cancelled", "batch_cancelled", "The batch was cancelled before this request ran.")
            elif b["expires_at"] is not None and now >= b["expires_at"]:
                await self._end(b, "expired", "batch_expired",
                                "This request could not be executed before the completion window expired.")
            elif b["status"] == "in_progress" and b["completed"] + b["failed"] >= b["total"]:
                await self._end(b, "completed", "", "")
            elif b["status"] == "validating" and now - b["created_at"] > RESEND_AFTER:
                await self.send(batch_id)

    async def _end(self, b: dict, status: str, code: str, message: str) -> None:
        """Write the output and error files (lines that did not run get `code`)
        and move the batch to `status`, unless another gateway did first."""
        left = {ln["idx"]: dumps_line(error_line(ln["custom_id"], code, message))
                for ln in await self.batches.lines(b["id"]) if not ln["done"]}
        if left:
            await self.batches.end_pending(b["id"], left)
            await self.requests.cancel([line_request_id(b["id"], i) for i in left])
        lines = await self.batches.lines(b["id"])  # again: a result may have come meanwhile
        now = int(time.time())
        stamp = {"completed": "completed_at", "cancelled": "cancelled_at", "expired": "expired_at"}[status]
        done = await self.batches.finish(b["id"], b["status"], status,
                                         _file(b["id"], "output", [ln["output"] for ln in lines if ln["ok"]]),
                                         _file(b["id"], "errors", [ln["output"] for ln in lines if not ln["ok"]]),
                                         finalizing_at=now, **{stamp: now})
        if done:
            log.info("batch.ended", batch_id=b["id"], status=status, not_run=len(left))


def _file(batch_id: str, kind: str, lines: list[str]) -> dict | None:
    if not lines:
        return None
    content = ("\n".join(lines) + "\n").encode()
    return {"id": f"file-{uuid.uuid4().hex}", "filename": f"{batch_id}_{kind}.jsonl", "purpose": "batch_output",
            "bytes": len(content), "created_at": int(time.time()), "content": content}
