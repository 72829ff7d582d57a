"""The database in one place: the declarative base, the engine, and the one session each request gets."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import msgspec
from advanced_alchemy.base import UUIDv7AuditBase, orm_registry
from litestar import Request
from litestar.datastructures import State
from sqlalchemy import JSON, event
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine

from app.reads import Reads
from app.settings import Settings

Base = UUIDv7AuditBase
metadata = orm_registry.metadata
# JSON documents: JSONB on PostgreSQL, JSON text on SQLite
JsonDoc = JSON().with_variant(JSONB(), "postgresql")
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


class Database:
    """The engine and two session makers: transactional for changes, autocommit for reads.

    A read needs no BEGIN and COMMIT: two round trips saved on every GET."""

    def __init__(self, settings: Settings) -> None:
        url = settings.resolved_database_url
        options = {"json_serializer": lambda o: msgspec.json.encode(o).decode(),  # several times faster than json
                   "json_deserializer": msgspec.json.decode,
                   "hide_parameters": True}  # an error's message never quotes the values (phones, names, texts)
        if url.startswith("sqlite"):
            self.engine = create_async_engine(url, connect_args={"timeout": 30}, **options)
            tune_sqlite(self.engine)
        else:
            # a steady pool sized for the expected concurrency: overflow connections churn and starve waiters
            self.engine = create_async_engine(url, pool_size=settings.db_pool_size,
                                              max_overflow=settings.db_pool_size // 4, pool_timeout=10, **options)
        self.reads = Reads(self.engine, url, settings.db_read_pool_size, settings.db_read_timeout_seconds)
        self.writer = async_sessionmaker(self.engine, expire_on_commit=False)
        self.reader = async_sessionmaker(self.engine.execution_options(isolation_level="AUTOCOMMIT"),
                                         expire_on_commit=False)

    async def dispose(self) -> None:
        await self.reads.close()
        await self.engine.dispose()


async def provide_db_session(state: State, request: Request[Any, Any, Any]) -> AsyncIterator[AsyncSession]:
    """One session per request, committed when the handler succeeds and before the answer is sent, so a
    failed commit is an error answer, never a 2xx for a change that did not happen. Realtime events the
    change wrote to user streams are published once it has committed."""
    database: Database = state.database
    session = (database.reader if request.method in SAFE_METHODS else database.writer)()
    try:
        yield session
        await session.commit()
    except BaseException:
        await session.rollback()
        raise
    finally:
        await session.close()
    staged = session.info.get("staged_events")
    if staged is not None and staged.events:  # persisted first, published now
        await state.bus.publish(staged.encode())


def tune_sqlite(engine: AsyncEngine) -> None:
    @event.listens_for(engine.sync_engine, "connect")
    def _on_connect(dbapi_connection: Any, _: Any) -> None:
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")  # readers never wait for the writer
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA busy_timeout=10000")  # a second writer waits instead of failing
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()


def dialect_insert(session: AsyncSession) -> Any:
    """INSERT with ON CONFLICT for the session's database (PostgreSQL and SQLite both have it)."""
    return postgresql.insert if session.get_bind().dialect.name == "postgresql" else sqlite.insert


async def insert_ignoring_duplicates(session: AsyncSession, model: Any, rows: list[dict[str, Any]]) -> int:
    """Bulk INSERT that skips rows clashing with a unique key (another instance got there first)."""
    if not rows:
        return 0
    insert = dialect_insert(session)
    total = 0
    for i in range(0, len(rows), 1000):  # bound the statement size
        result = await session.execute(insert(model).values(rows[i:i + 1000]).on_conflict_do_nothing())
        total += max(result.rowcount or 0, 0)  # type: ignore[attr-defined]
    return total
