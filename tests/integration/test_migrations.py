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
    engine = create_async_engine(url)
    async with engine.connect() as conn:
        names = await conn.run_sync(lambda sync: set(inspect(sync).get_table_names()))
    await engine.dispose()
    return names - {"alembic_version"}


async def test_upgrade_downgrade_upgrade(tmp_path: Path) -> None:
    url = await fresh_database_url(tmp_path, f"migrations_{secrets.token_hex(4)}")
    await asyncio.to_thread(upgrade, url)
    assert await table_names(url) == set(metadata.tables)  # the models and the history agree
    await asyncio.to_thread(downgrade, url)
    assert await table_names(url) == set()
    await asyncio.to_thread(upgrade, url)
    assert await table_names(url) == set(metadata.tables)
