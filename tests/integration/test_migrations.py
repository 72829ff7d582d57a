"""One Alembic history upgrades and downgrades a fresh database (PostgreSQL or SQLite, by profile)."""

from __future__ import annotations

import asyncio
import secrets
import uuid
from pathlib import Path

from sqlalchemy import inspect, text
from sqlalchemy.ext.asyncio import create_async_engine

from app.db import metadata
from app.migrate import downgrade, upgrade
from tests.conftest import fresh_database_url


async def table_names(url: str) -> set[str]:
    return set(await columns_by_table(url))


async def columns_by_table(url: str) -> dict[str, set[str]]:
    engine = create_async_engine(url)
    async with engine.connect() as conn:
        def read(sync: object) -> dict[str, set[str]]:
            inspector = inspect(sync)
            return {t: {c["name"] for c in inspector.get_columns(t)} for t in inspector.get_table_names()}
        found = await conn.run_sync(read)
    await engine.dispose()
    found.pop("alembic_version", None)
    return found


async def test_upgrade_downgrade_upgrade(tmp_path: Path) -> None:
    url = await fresh_database_url(tmp_path, f"migrations_{secrets.token_hex(4)}")
    await asyncio.to_thread(upgrade, url)
    assert await table_names(url) == set(metadata.tables)  # the models and the history agree
    await asyncio.to_thread(downgrade, url)
    assert await table_names(url) == set()
    await asyncio.to_thread(upgrade, url)
    assert await table_names(url) == set(metadata.tables)


async def test_history_builds_every_column_of_the_models(tmp_path: Path) -> None:
    url = await fresh_database_url(tmp_path, f"migrations_{secrets.token_hex(4)}")
    await asyncio.to_thread(upgrade, url)
    wanted = {name: {c.name for c in table.columns} for name, table in metadata.tables.items()}
    assert await columns_by_table(url) == wanted


async def test_events_from_before_the_worker_are_not_pushed_when_it_arrives(tmp_path: Path) -> None:
    """Nothing ever sent outbox rows before migration 0009: they must not all reach phones on the first deploy."""
    url = await fresh_database_url(tmp_path, f"migrations_{secrets.token_hex(4)}")
    await asyncio.to_thread(upgrade, url, "0008")
    engine = create_async_engine(url)
    try:
        async with engine.begin() as conn:
            await conn.execute(text(
                "INSERT INTO outbox_event (id, type, recipients, payload, created_at, updated_at)"
                " VALUES (:id, 'push', '[]', '{}', CURRENT_TIMESTAMP, CURRENT_TIMESTAMP)"),
                {"id": uuid.uuid4() if url.startswith("postgresql") else uuid.uuid4().bytes})
        await asyncio.to_thread(upgrade, url)
        async with engine.connect() as conn:
            pending = await conn.scalar(text("SELECT count(*) FROM outbox_event WHERE dispatched_at IS NULL"))
        assert pending == 0
    finally:
        await engine.dispose()
