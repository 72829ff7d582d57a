"""The fuzz writes whatever schemathesis makes up (specialty rules, services, staff changes, profiles) as every
role, so it runs on an app and a database of its own: no other test of the run sees what it wrote."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
from litestar.testing import AsyncTestClient
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker, create_async_engine

from app.settings import Settings
from tests.conftest import migrated_database_url, running


@pytest.fixture(scope="package")
async def fuzz_database_url(data_dir: Path) -> str:
    url = await migrated_database_url(data_dir, "clinic_fuzz")
    return url


@pytest.fixture(scope="package")
def test_settings(test_settings: Settings, fuzz_database_url: str) -> Settings:
    return msgspec.structs.replace(test_settings, database_url=fuzz_database_url,
                                   s3_bucket=f"clinic-fuzz-{secrets.token_hex(3)}")


@pytest.fixture(scope="package")
async def client(test_settings: Settings) -> AsyncIterator[AsyncTestClient[Any]]:
    async with running(test_settings) as c:
        yield c


@pytest.fixture(scope="package")
async def session_maker(test_settings: Settings) -> AsyncIterator[async_sessionmaker[AsyncSession]]:
    engine = create_async_engine(test_settings.database_url)
    yield async_sessionmaker(engine, expire_on_commit=False)
    await engine.dispose()
