"""Alembic environment: one history for PostgreSQL and SQLite (batch mode makes ALTERs portable)."""

from __future__ import annotations

import asyncio

from alembic import context
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import create_async_engine

import app.accounts.models
import app.audit.models
import app.chat.models
import app.consultations.models
import app.documents.models
import app.notifications.models
import app.outbox
import app.payments.models
import app.rtc.models
import app.scheduling.models  # noqa: F401
from app.db import metadata
from app.settings import settings_from_env

config = context.config
url = config.get_main_option("sqlalchemy.url") or settings_from_env().resolved_database_url


def run(connection: Connection) -> None:
    context.configure(connection=connection, target_metadata=metadata, render_as_batch=True,
                      compare_type=False)  # SQLite reflects GUID as NUMERIC: type diffs are noise
    with context.begin_transaction():
        context.run_migrations()


async def run_async() -> None:
    engine = create_async_engine(url)
    async with engine.connect() as connection:
        await connection.run_sync(run)
    await engine.dispose()


if context.is_offline_mode():
    context.configure(url=url, target_metadata=metadata, literal_binds=True, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()
else:
    asyncio.run(run_async())
