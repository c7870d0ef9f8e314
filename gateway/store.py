"""Queries on the gateway's database (gateway/db.py): the submission queue's
requests (claims and results) and the Batch API's files, batches and lines.
Every change is one short transaction whose condition says who may make it,
so several gateways on one database never apply the same step twice."""
from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

from sqlalchemy import and_, bindparam, delete, insert, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncEngine

from fastserve.gateway.db import batch_lines, batches, files, requests


@dataclass
class Claim:
    """What the submission queue may do with a request id: "run" it (this
    claim finishes it), send its stored "done" result again, or drop a
    duplicate of one that is "busy" elsewhere or "cancelled"."""

    action: str
    result: bytes | None = None


class RequestStore:
    """Claims and results are written in groups: the requests that arrive
    while one transaction runs share the next one (a request costs two
    statements of a shared transaction, not two transactions of its own)."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        dialect = postgresql if engine.dialect.name == "postgresql" else sqlite
        self._insert = dialect.insert
        self._claims: list[tuple[str, str, bool, asyncio.Future]] = []
        self._finishes: list[tuple[str, str, bytes, asyncio.Future]] = []
        self._writer: asyncio.Task | None = None

    async def claim(self, request_id: str, owner: str, redelivered: bool) -> Claim:
        """A redelivered message takes over a running claim: the broker gives a
        message to another consumer only when the one that had it went away."""
        fut = asyncio.get_running_loop().create_future()
        self._claims.append((request_id, owner, redelivered, fut))
        self._wake()
        return await fut

    async def finish(self, request_id: str, owner: str, result: bytes) -> bool:
        """Store the result; False when the claim was taken over or cancelled meanwhile."""
        fut = asyncio.get_running_loop().create_future()
        self._finishes.append((request_id, owner, result, fut))
        self._wake()
        return await fut

    def _wake(self) -> None:
        if self._writer is None or self._writer.done():
            self._writer = asyncio.get_running_loop().create_task(self._write(), name="request-store-writer")

    async def _write(self) -> None:
        while self._claims or self._finishes:
            claims, self._claims = self._claims, []
            finishes, self._finishes = self._finishes, []
            try:
                async with self.engine.begin() as conn:
                    claimed = await self._write_claims(conn, claims) if claims else []
                    finished = await self._write_finishes(conn, finishes) if finishes else []
            except Exception as exc:  # noqa: BLE001 - every waiter hears it
                for *_, fut in claims + finishes:
                    if not fut.done():
                        fut.set_exception(exc)
                continue
            for (*_, fut), outcome in zip(claims + finishes, claimed + finished):
                if not fut.done():
                    fut.set_result(outcome)

    async def _write_claims(self, conn, claims) -> list[Claim]:
        now = time.time()
        await conn.execute(self._insert(requests).on_conflict_do_nothing(), [
            {"request_id": rid, "state": "running", "owner": owner, "created_at": now} for rid, owner, _, _ in claims])
        rows = {r.request_id: r for r in await conn.execute(select(
            requests.c.request_id, requests.c.state, requests.c.owner, requests.c.result).where(
            requests.c.request_id.in_({rid for rid, *_ in claims})))}
        out = []
        for rid, owner, redelivered, _ in claims:
            row = rows[rid]
            if row.state == "running" and row.owner == owner:
                out.append(Claim("run"))
            elif row.state == "done":
                out.append(Claim("done", row.result))
            elif row.state == "running" and redelivered:
                await conn.execute(update(requests).where(requests.c.request_id == rid).values(owner=owner))
                out.append(Claim("run"))
            else:
                out.append(Claim("busy" if row.state == "running" else row.state))
        return out

    async def _write_finishes(self, conn, finishes) -> list[bool]:
        now = time.time()
        await conn.execute(update(requests).where(and_(
            requests.c.request_id == bindparam("b_id"), requests.c.owner == bindparam("b_owner"),
            requests.c.state == "running")).values(state="done", result=bindparam("b_result"), finished_at=now),
            [{"b_id": rid, "b_owner": owner, "b_result": result} for rid, owner, result, _ in finishes])
        rows = {r.request_id: r for r in await conn.execute(select(
            requests.c.request_id, requests.c.state, requests.c.owner).where(
            requests.c.request_id.in_({rid for rid, *_ in finishes})))}
        return [rid in rows and rows[rid].owner == owner and rows[rid].state == "done"
                for rid, owner, _, _ in finishes]

    async def cancel(self, request_ids: list[str]) -> None:
        """Requests that must not run (a cancelled batch's): queued copies are dropped when taken."""
        if not request_ids:
            return
        now = time.time()
        async with self.engine.begin() as conn:
            stmt = self._insert(requests).on_conflict_do_update(
                index_elements=[requests.c.request_id], set_={"state": "cancelled"},
                where=requests.c.state == "running")
            await conn.execute(stmt, [{"request_id": r, "state": "cancelled", "owner": "", "created_at": now}
                                      for r in request_ids])

    async def purge(self, older_than: float) -> int:
        """Forget finished requests older than `older_than` (time.time())."""
        async with self.engine.begin() as conn:
            res = await conn.execute(delete(requests).where(and_(
                requests.c.state != "running", requests.c.created_at < older_than)))
            return res.rowcount


class BatchStore:
    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine

    # ------------------------------------------------------------ files
    async def add_file(self, row: dict) -> None:
        async with self.engine.begin() as conn:
            await conn.execute(insert(files).values(**row))

    async def file(self, file_id: str) -> dict | None:
        async with self.engine.connect() as conn:
            row = (await conn.execute(select(files.c.id, files.c.filename, files.c.purpose, files.c.bytes,
                                             files.c.created_at).where(files.c.id == file_id))).first()
            return dict(row._mapping) if row else None

    async def file_content(self, file_id: str) -> bytes | None:
        async with self.engine.connect() as conn:
            return (await conn.execute(select(files.c.content).where(files.c.id == file_id))).scalar()

    # ------------------------------------------------------------ batches
    async def create(self, batch: dict, lines: list[dict]) -> None:
        async with self.engine.begin() as conn:
            await conn.execute(insert(batches).values(**batch))
            if lines:
                await conn.execute(insert(batch_lines), lines)

    async def get(self, batch_id: str) -> dict | None:
        async with self.engine.connect() as conn:
            row = (await conn.execute(select(batches).where(batches.c.id == batch_id))).first()
            return dict(row._mapping) if row else None

    async def list(self, after: str | None, limit: int) -> list[dict]:
        """Newest first; `after`: the id of the last batch of the previous page."""
        q = select(batches).order_by(batches.c.created_at.desc(), batches.c.id.desc()).limit(limit)
        async with self.engine.connect() as conn:
            if after is not None:
                ref = (await conn.execute(select(batches.c.created_at).where(batches.c.id == after))).scalar()
                if ref is not None:
                    q = q.where((batches.c.created_at < ref) | and_(batches.c.created_at == ref,
                                                                    batches.c.id < after))
            return [dict(r._mapping) for r in (await conn.execute(q)).all()]

    async def ids_in(self, statuses: tuple[str, ...]) -> list[str]:
        async with self.engine.connect() as conn:
            return list((await conn.execute(select(batches.c.id).where(batches.c.status.in_(statuses)))).scalars())

    async def move(self, batch_id: str, frm: tuple[str, ...], to: str, **values: Any) -> bool:
        """Change a batch's status if it is in one of `frm`: True for the one caller that did."""
        async with self.engine.begin() as conn:
            res = await conn.execute(update(batches).where(and_(batches.c.id == batch_id, batches.c.status.in_(frm)))
                                     .values(status=to, **values))
            return res.rowcount == 1

    async def pending_lines(self, batch_id: str) -> list[int]:
        async with self.engine.connect() as conn:
            q = select(batch_lines.c.idx).where(and_(batch_lines.c.batch_id == batch_id, ~batch_lines.c.done))
            return list((await conn.execute(q.order_by(batch_lines.c.idx))).scalars())

    async def custom_id(self, batch_id: str, idx: int) -> str | None:
        async with self.engine.connect() as conn:
            return (await conn.execute(select(batch_lines.c.custom_id).where(and_(
                batch_lines.c.batch_id == batch_id, batch_lines.c.idx == idx)))).scalar()

    async def record(self, batch_id: str, idx: int, ok: bool, output: str) -> dict | None:
        """A line ended: count it once (a result may come twice). The batch's
        row after the count, or None when this line was already counted."""
        async with self.engine.begin() as conn:
            res = await conn.execute(update(batch_lines).where(and_(
                batch_lines.c.batch_id == batch_id, batch_lines.c.idx == idx, ~batch_lines.c.done))
                .values(done=True, ok=ok, output=output))
            if res.rowcount != 1:
                return None
            counter = batches.c.completed if ok else batches.c.failed
            await conn.execute(update(batches).where(batches.c.id == batch_id).values({counter: counter + 1}))
            row = (await conn.execute(select(batches).where(batches.c.id == batch_id))).first()
            return dict(row._mapping)

    async def end_pending(self, batch_id: str, outputs: dict[int, str]) -> None:
        """Lines that will not run (the batch was cancelled or expired): their error lines."""
        if not outputs:
            return
        async with self.engine.begin() as conn:  # one statement, executed for every line
            await conn.execute(update(batch_lines).where(and_(
                batch_lines.c.batch_id == batch_id, batch_lines.c.idx == bindparam("b_idx"), ~batch_lines.c.done))
                .values(done=True, ok=False, output=bindparam("b_output")),
                [{"b_idx": idx, "b_output": output} for idx, output in outputs.items()])

    async def lines(self, batch_id: str) -> list[dict]:
        async with self.engine.connect() as conn:
            q = select(batch_lines.c.idx, batch_lines.c.custom_id, batch_lines.c.done, batch_lines.c.ok,
                       batch_lines.c.output).where(batch_lines.c.batch_id == batch_id).order_by(batch_lines.c.idx)
            return [dict(r._mapping) for r in (await conn.execute(q)).all()]

    async def finish(self, batch_id: str, frm: str, to: str, output: dict | None, error: dict | None,
                     **values: Any) -> bool:
        """Store the output and error files and move the batch to its final status, in one transaction."""
        async with self.engine.begin() as conn:
            res = await conn.execute(update(batches).where(and_(batches.c.id == batch_id, batches.c.status == frm))
                                     .values(status=to, output_file_id=output and output["id"],
                                             error_file_id=error and error["id"], **values))
            if res.rowcount != 1:
                return False
            for f in (output, error):
                if f is not None:
                    await conn.execute(insert(files).values(**f))
            return True
