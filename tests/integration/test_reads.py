"""The hot read path (app/reads.py) on the profile under test: PostgreSQL through asyncpg, SQLite through Core."""

from __future__ import annotations

import socket
import uuid
from typing import Any

import msgspec
import pytest
from sqlalchemy import bindparam, func, select

from app.accounts.models import User
from app.db import Database
from app.errors import Unavailable
from app.settings import Settings
from tests.conftest import Session

BY_ID = select(User.id, User.roles, User.questionnaire, User.full_name).where(User.id == bindparam("uid"))
# a constant IN list is written into the SQL: on PostgreSQL it becomes parameters of its own at compile time
STAFF_OF_ROLES = select(User.id).where(User.id == bindparam("uid"), User.timezone.in_(["Europe/Moscow", "UTC"]))
EXPANDING = select(User.id).where(User.id.in_(bindparam("ids", expanding=True)))


@pytest.fixture
async def database(test_settings: Settings) -> Any:
    db = Database(test_settings)
    try:
        yield db
    finally:
        await db.dispose()


async def test_a_row_comes_back_by_label_with_json_decoded(database: Database, patient: Session) -> None:
    row = await database.reads.one(BY_ID, uid=patient.id)
    assert row is not None
    assert row["id"] == patient.id
    assert row["roles"] == ["patient"]  # a JSON column, decoded on both profiles
    assert isinstance(row["questionnaire"], dict)
    assert await database.reads.one(BY_ID, uid=uuid.UUID(int=1)) is None


async def test_a_constant_in_list_and_a_parameter_are_both_bound(database: Database, patient: Session) -> None:
    rows = await database.reads.all(STAFF_OF_ROLES, uid=patient.id)
    assert [r["id"] for r in rows] == [patient.id]
    # the second run takes the statement compiled by the first
    assert [r["id"] for r in await database.reads.all(STAFF_OF_ROLES, uid=patient.id)] == [patient.id]


async def test_a_missing_parameter_is_a_clear_error(database: Database) -> None:
    with pytest.raises(Exception, match="uid") as raised:
        await database.reads.all(BY_ID)
    if database.reads.postgres:  # ours; on SQLite SQLAlchemy's own
        assert raised.type is TypeError


async def test_an_expanding_parameter_is_refused_on_the_asyncpg_path(database: Database, patient: Session) -> None:
    if database.reads.postgres:  # asyncpg takes no POSTCOMPILE placeholder: refused before it reaches the server
        with pytest.raises(TypeError, match="expanding"):
            await database.reads.all(EXPANDING, ids=[patient.id])
    else:
        assert [r["id"] for r in await database.reads.all(EXPANDING, ids=[patient.id])] == [patient.id]


async def test_a_read_slower_than_its_timeout_is_unavailable(test_settings: Settings) -> None:
    db = Database(msgspec.structs.replace(test_settings, db_read_timeout_seconds=0.2))
    try:
        if not db.reads.postgres:
            pytest.skip("asyncpg's statement timeout: PostgreSQL only")
        with pytest.raises(Unavailable):
            await db.reads.all(select(func.pg_sleep(bindparam("s"))), s=2)
        assert await db.reads.one(select(func.now())) is not None  # the pool goes on
    finally:
        await db.dispose()


async def test_a_database_that_cannot_be_reached_is_unavailable(test_settings: Settings) -> None:
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    db = Database(msgspec.structs.replace(test_settings, database_url=f"postgresql+asyncpg://u:p@127.0.0.1:{port}/x"))
    try:
        with pytest.raises(Unavailable) as refused:
            await db.reads.all(BY_ID, uid=uuid.UUID(int=1))
        assert refused.value.extra["reason"] == "database_unavailable"
    finally:
        await db.dispose()
