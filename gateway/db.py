"""The gateway's database: its tables, and opening it with the schema brought
up to date by Alembic (gateway/migrations/).

SQLite (a file: one node, the embedded mode) or PostgreSQL (several gateways
share the work). Users give plain URLs; the async drivers (aiosqlite,
asyncpg) are picked here. A schema change is a new Alembic revision:

    alembic -c gateway/alembic.ini revision --autogenerate -m "what changed"
"""
from __future__ import annotations

import asyncio
import fcntl
import os
from pathlib import Path

from sqlalchemy import (
    JSON, Boolean, Column, Float, Integer, LargeBinary, MetaData, String, Table, Text, event, text,
)
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

metadata = MetaData()

# The submission queue's requests, by the client's id: who runs one (its
# claim), and its result once done, so an id that ran is never run again.
requests = Table(
    "requests", metadata,
    Column("request_id", String(256), primary_key=True),
    Column("state", String(16), nullable=False),  # running | done | cancelled
    Column("owner", String(64), nullable=False),  # the claim that may finish it
    Column("result", LargeBinary),  # the SubmitResult, msgpack
    Column("created_at", Float, nullable=False, index=True),
    Column("finished_at", Float),
)

files = Table(
    "files", metadata,
    Column("id", String(64), primary_key=True),
    Column("filename", String(512), nullable=False),
    Column("purpose", String(32), nullable=False),
    Column("bytes", Integer, nullable=False),
    Column("created_at", Integer, nullable=False),
    Column("content", LargeBinary, nullable=False),
)

batches = Table(
    "batches", metadata,
    Column("id", String(64), primary_key=True),
    Column("endpoint", String(64), nullable=False),
    Column("input_file_id", String(64), nullable=False),
    Column("completion_window", String(16), nullable=False),
    Column("status", String(16), nullable=False, index=True),
    Column("output_file_id", String(64)),
    Column("error_file_id", String(64)),
    Column("metadata", JSON),
    Column("errors", JSON),
    Column("total", Integer, nullable=False),
    Column("completed", Integer, nullable=False),
    Column("failed", Integer, nullable=False),
    Column("created_at", Integer, nullable=False),
    Column("in_progress_at", Integer),
    Column("expires_at", Integer),
    Column("finalizing_at", Integer),
    Column("completed_at", Integer),
    Column("failed_at", Integer),
    Column("expired_at", Integer),
    Column("cancelling_at", Integer),
    Column("cancelled_at", Integer),
)

# One row per line of a batch's input file: its custom_id, and once it ended,
# its line of the output file (ok) or of the error file.
batch_lines = Table(
    "batch_lines", metadata,
    Column("batch_id", String(64), primary_key=True),
    Column("idx", Integer, primary_key=True),
    Column("custom_id", Text, nullable=False),
    Column("done", Boolean, nullable=False),
    Column("ok", Boolean),
    Column("output", Text),
)

MIGRATIONS = Path(__file__).with_name("migrations")


def engine_url(url: str) -> str:
    """A user's URL with this module's async driver."""
    if url.startswith("sqlite:///"):
        return "sqlite+aiosqlite:///" + os.path.expanduser(url[len("sqlite:///"):])
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+asyncpg://" + url[len(prefix):]
    raise ValueError(f"unsupported database URL {url!r}: sqlite:///PATH or postgresql://...")


def make_engine(url: str) -> AsyncEngine:
    full = engine_url(url)
    if full.startswith("sqlite"):
        path = Path(full.split(":///", 1)[1])
        path.parent.mkdir(parents=True, exist_ok=True)
        # One connection: SQLite has one writer at a time, and connections of one
        # process contending for it would wait in its busy handler's sleeps (or
        # deadlock upgrading a read). timeout: the wait for another process's
        # write (gateways of one node may share the file).
        engine = create_async_engine(full, connect_args={"timeout": 30}, pool_size=1, max_overflow=0)

        @event.listens_for(engine.sync_engine, "connect")
        def _wal(dbapi_conn, _record) -> None:
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")  # in WAL mode: durable across a crash of the process
            cur.close()
        return engine
    return create_async_engine(full, pool_size=10, max_overflow=10)


async def open_database(url: str) -> AsyncEngine:
    """An engine on `url` whose schema is at the newest revision. Gateways
    starting together migrate one at a time (a PostgreSQL advisory lock, a
    file lock beside a SQLite file)."""
    engine = make_engine(url)
    if engine.dialect.name == "sqlite":
        lock_path = engine.url.database + ".lock"
        fd = os.open(lock_path, os.O_CREAT | os.O_RDWR, 0o644)
        try:
            await asyncio.to_thread(fcntl.flock, fd, fcntl.LOCK_EX)
            async with engine.begin() as conn:
                await conn.run_sync(_upgrade)
        finally:
            os.close(fd)  # releases the lock
    else:
        async with engine.begin() as conn:
            await conn.execute(text("SELECT pg_advisory_xact_lock(7431996)"))
            await conn.run_sync(_upgrade)
    return engine


def _upgrade(connection) -> None:
    from alembic import command
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.attributes["connection"] = connection
    command.upgrade(cfg, "head")
