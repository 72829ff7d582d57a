"""The hot read path (app/reads.py) on the profile under test: PostgreSQL through asyncpg, SQLite through Core."""

from __future__ import annotations

import asyncio
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


PID = select(func.pg_backend_pid().label("pid"))
SLOW_PID = select(func.pg_backend_pid().label("pid"), func.pg_sleep(bindparam("s")).label("slept"))


@pytest.fixture
async def two_readers(test_settings: Settings) -> Any:
    db = Database(msgspec.structs.replace(test_settings, db_read_pool_size=2))
    if not db.reads.postgres:
        await db.dispose()
        pytest.skip("the read connections are asyncpg's: PostgreSQL only")
    try:
        yield db
    finally:
        await db.dispose()


async def test_reads_share_no_more_connections_than_the_pool_size(two_readers: Database) -> None:
    rows = await asyncio.gather(*(two_readers.reads.one(SLOW_PID, s=0.02) for _ in range(20)))
    assert len({r["pid"] for r in rows if r is not None}) == 2  # all 20 answered, on two connections


async def test_a_read_cancelled_in_line_or_mid_statement_leaves_the_connections_usable(two_readers: Database) -> None:
    reads = two_readers.reads
    busy = [asyncio.create_task(reads.one(SLOW_PID, s=0.5)) for _ in range(2)]
    await asyncio.sleep(0.1)
    in_line = asyncio.create_task(reads.one(PID))
    await asyncio.sleep(0.05)
    in_line.cancel()  # waiting for a connection
    busy[0].cancel()  # its statement is running on the server
    for task in (in_line, busy[0]):
        with pytest.raises(asyncio.CancelledError):
            await task
    assert (await busy[1]) is not None
    pids = {r["pid"] for r in await asyncio.gather(*(reads.one(SLOW_PID, s=0.02) for _ in range(6))) if r}
    assert len(pids) == 2  # both connections serve again: none leaked, none lost


async def test_a_connection_the_server_ended_is_replaced(two_readers: Database, test_settings: Settings) -> None:
    reads = two_readers.reads
    first = await reads.one(PID)
    assert first is not None
    killer = Database(test_settings)
    try:
        await killer.reads.one(select(func.pg_terminate_backend(bindparam("pid"))), pid=first["pid"])
    finally:
        await killer.dispose()
    await asyncio.sleep(0.2)  # the client sees the socket close
    again = await reads.one(PID)
    assert again is not None
    assert again["pid"] != first["pid"]
