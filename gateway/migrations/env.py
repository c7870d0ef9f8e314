"""Alembic environment. The gateway runs migrations on its own connection
(fastserve.gateway.db.open_database); the `alembic` command (gateway/alembic.ini)
makes one from sqlalchemy.url."""
from __future__ import annotations

import asyncio

from alembic import context

from fastserve.gateway.db import engine_url, make_engine, metadata


def run(connection) -> None:
    context.configure(connection=connection, target_metadata=metadata, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()


async def run_from_url(url: str) -> None:
    engine = make_engine(url)
    async with engine.begin() as conn:
        await conn.run_sync(run)
    await engine.dispose()


connection = context.config.attributes.get("connection")
if connection is not None:
    run(connection)
elif context.is_offline_mode():
    context.configure(url=engine_url(context.config.get_main_option("sqlalchemy.url")), target_metadata=metadata,
                      literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()
else:
    asyncio.run(run_from_url(context.config.get_main_option("sqlalchemy.url")))
