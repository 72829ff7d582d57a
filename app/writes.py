"""Hot writes: a few statements in one transaction, written once in SQLAlchemy Core, run without the ORM.

On PostgreSQL the transaction runs straight on an asyncpg connection of the engine's pool: a statement is
compiled once (app/reads.py `compile_once`, as for the hot reads) and costs one round trip and a few tens of
microseconds, where the session's unit of work, identity map and per-call compilation cost several times that.
On SQLite (the embedded profile) the same statements run through the request's session, so its single-writer
lock orders writers as before. Rows come back as mappings keyed by column label: `row["name"]` on either.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any, Protocol, cast

import asyncpg
from sqlalchemy import Executable
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from app.reads import compile_once

Row = Mapping[str, Any]
# a unique key refused the row, whichever way the statement went
UNIQUE_VIOLATIONS = (IntegrityError, asyncpg.UniqueViolationError)


class Tx(Protocol):
    async def all(self, statement: Executable, **params: Any) -> Sequence[Row]: ...

    async def one(self, statement: Executable, **params: Any) -> Row | None: ...

    async def run(self, statement: Executable, **params: Any) -> int:
        """A statement without rows back: how many rows it changed."""

    async def run_many(self, statement: Executable, rows: Sequence[Mapping[str, Any]]) -> None:
        """One statement for several parameter sets (one round trip on PostgreSQL)."""


class PgTx:
    """Inside a transaction opened on this asyncpg connection."""

    def __init__(self, connection: asyncpg.Connection, engine: AsyncEngine) -> None:
        self.connection = connection
        self.engine = engine

    async def all(self, statement: Executable, **params: Any) -> Sequence[Row]:
        compiled = compile_once(statement, self.engine.dialect, params)
        return cast(Sequence[Row], await self.connection.fetch(compiled.sql, *compiled.arguments(params)))

    async def one(self, statement: Executable, **params: Any) -> Row | None:
        compiled = compile_once(statement, self.engine.dialect, params)
        return cast(Row | None, await self.connection.fetchrow(compiled.sql, *compiled.arguments(params)))

    async def run(self, statement: Executable, **params: Any) -> int:
        compiled = compile_once(statement, self.engine.dialect, params)
        status = await self.connection.execute(compiled.sql, *compiled.arguments(params))
        count = status.rsplit(" ", 1)[-1]  # "UPDATE 1", "INSERT 0 1"
        return int(count) if count.isdigit() else 0

    async def run_many(self, statement: Executable, rows: Sequence[Mapping[str, Any]]) -> None:
        if rows:
            compiled = compile_once(statement, self.engine.dialect, rows[0])
            await self.connection.executemany(compiled.sql, [compiled.arguments(r) for r in rows])


class SessionTx:
    """Through a session's transaction (SQLite, or a change that already wrote through the session)."""

    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def all(self, statement: Executable, **params: Any) -> Sequence[Row]:
        return cast(Sequence[Row], (await self.session.execute(statement, params)).mappings().all())

    async def one(self, statement: Executable, **params: Any) -> Row | None:
        return cast(Row | None, (await self.session.execute(statement, params)).mappings().first())

    async def run(self, statement: Executable, **params: Any) -> int:
        result = await self.session.execute(statement, params)
        return max(getattr(result, "rowcount", 0) or 0, 0)

    async def run_many(self, statement: Executable, rows: Sequence[Mapping[str, Any]]) -> None:
        if rows:
            await self.session.execute(statement, list(rows))


class Connection:
    """A connection for a change: statements that each commit by themselves, then `transaction()`."""

    def __init__(self, session: AsyncSession, driver: asyncpg.Connection | None, engine: Any) -> None:
        self.session, self.driver, self.engine = session, driver, engine
        self.each: Tx = PgTx(driver, engine) if driver is not None else SessionTx(session)

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[Tx]:
        """Committed when the block ends without an error, rolled back otherwise."""
        if self.driver is not None:
            async with self.driver.transaction():
                yield self.each
            return
        try:
            yield self.each
            await self.session.commit()
        except BaseException:
            await self.session.rollback()
            raise


@asynccontextmanager
async def connection(session: AsyncSession, *, own: bool = True) -> AsyncIterator[Connection]:
    """On PostgreSQL (with own) a connection of the engine's pool straight through asyncpg: the session stays
    unused and nothing it holds is seen; otherwise, and always on SQLite, the session itself."""
    engine = session.bind
    if own and isinstance(engine, AsyncEngine) and engine.dialect.name == "postgresql":
        async with engine.connect() as pooled:
            driver = (await pooled.get_raw_connection()).driver_connection
            assert driver is not None
            yield Connection(session, driver, engine)
        return
    yield Connection(session, None, engine)


@asynccontextmanager
async def transaction(session: AsyncSession, *, own: bool = True) -> AsyncIterator[Tx]:
    """A transaction committed when the block ends without an error, rolled back otherwise (see `connection`)."""
    async with connection(session, own=own) as conn, conn.transaction() as tx:
        yield tx


@asynccontextmanager
async def autocommit(session: AsyncSession) -> AsyncIterator[Tx]:
    """Statements that each commit by themselves (one statement is atomic alone): on PostgreSQL straight
    through asyncpg with no BEGIN and COMMIT round trips; on SQLite in the session, committed at the end."""
    async with connection(session) as conn:
        if conn.driver is not None:
            yield conn.each
            return
        async with conn.transaction() as tx:
            yield tx
