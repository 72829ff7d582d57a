"""One Alembic history upgrades and downgrades a fresh database (PostgreSQL or SQLite, by profile)."""

from __future__ import annotations

import asyncio
import secrets
from pathlib import Path

from sqlalchemy import inspect
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
