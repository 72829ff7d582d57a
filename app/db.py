"""The database in one place: the declarative base, the engine config and the session for services."""

from __future__ import annotations

from typing import Any

from advanced_alchemy.base import UUIDv7AuditBase, orm_registry
from advanced_alchemy.extensions.litestar import (
    AsyncSessionConfig,
    EngineConfig,
    SQLAlchemyAsyncConfig,
)
from sqlalchemy import JSON, event
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from app.settings import Settings

Base = UUIDv7AuditBase
metadata = orm_registry.metadata
# JSON documents: JSONB on PostgreSQL, JSON text on SQLite
JsonDoc = JSON().with_variant(JSONB(), "postgresql")


def alchemy_config(settings: Settings) -> SQLAlchemyAsyncConfig:
    url = settings.resolved_database_url
    is_sqlite = url.startswith("sqlite")
    engine = (
        EngineConfig(connect_args={"timeout": 30})
        if is_sqlite
        # a steady pool sized for the expected concurrency: overflow connections churn and starve waiters
        else EngineConfig(pool_size=settings.db_pool_size, max_overflow=settings.db_pool_size // 4, pool_timeout=10)
    )
    config = SQLAlchemyAsyncConfig(
        connection_string=url,
        engine_config=engine,
        session_config=AsyncSessionConfig(expire_on_commit=False),
        before_send_handler="autocommit",  # one session a request: committed after a 2xx, else rolled back
        create_all=False,  # the schema comes from Alembic only
    )
    if is_sqlite:
        tune_sqlite(config.get_engine())
    return config


def tune_sqlite(engine: AsyncEngine) -> None:
    @event.listens_for(engine.sync_engine, "connect")
    def _on_connect(dbapi_connection: Any, _: Any) -> None:
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")  # readers never wait for the writer
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA busy_timeout=10000")  # a second writer waits instead of failing
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()


async def insert_ignoring_duplicates(session: AsyncSession, model: Any, rows: list[dict[str, Any]]) -> int:
    """Bulk INSERT that skips rows clashing with a unique key (another instance got there first)."""
    if not rows:
        return 0
    insert = postgresql.insert if session.get_bind().dialect.name == "postgresql" else sqlite.insert
    total = 0
    for i in range(0, len(rows), 1000):  # bound the statement size
        result = await session.execute(insert(model).values(rows[i:i + 1000]).on_conflict_do_nothing())
        total += max(result.rowcount or 0, 0)  # type: ignore[attr-defined]
    return total
