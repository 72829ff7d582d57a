"""Hot reads: one statement each, written once in SQLAlchemy Core, run without a session or the ORM.

A signed-in GET spent most of its CPU in the session, the identity map and result processing, not in the
database. Here a statement is compiled once per dialect; on PostgreSQL it runs straight on a pooled asyncpg
connection (asyncpg prepares it once per connection), on SQLite (the embedded profile) through SQLAlchemy
Core on the same engine as everything else. Rows come back as mappings keyed by column label, so an answer is
built as `SomeOut(**row)`, and secrecy masks are applied to those answers as data (app/access.py).

The pool is the readers' own, in autocommit: a read leaves no transaction, so a connection goes back without
the round trip of a reset.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from typing import Any, cast

import asyncpg
import msgspec
from sqlalchemy import ClauseElement, Executable, make_url
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.sql.compiler import SQLCompiler

from app.errors import Unavailable

Row = Mapping[str, Any]


class _Compiled:
    """A statement as asyncpg takes it: its SQL, and per positional parameter either the caller's name for it
    or, for a value written into the statement (a constant, an IN list), that value."""

    __slots__ = ("slots", "sql")

    def __init__(self, sql: str, slots: tuple[tuple[str, bool, Any], ...]) -> None:
        self.sql, self.slots = sql, slots  # (name, given by the caller, constant value)

    def arguments(self, params: Mapping[str, Any]) -> list[Any]:
        try:
            return [params[name] if given else value for name, given, value in self.slots]
        except KeyError as exc:
            raise TypeError(f"the statement needs the parameter {exc}") from None


async def _no_reset(_: asyncpg.Connection) -> None:
    """A read runs in autocommit and sets nothing: there is nothing to reset when it goes back to the pool."""


async def _decode_json(connection: asyncpg.Connection) -> None:
    for name in ("json", "jsonb"):
        await connection.set_type_codec(name, schema="pg_catalog", format="text",
                                        encoder=lambda o: msgspec.json.encode(o).decode(),
                                        decoder=msgspec.json.decode)


class Reads:
    """Runs read statements: `await reads.all(STATEMENT, uid=...)` → a list of rows, `one` → a row or None.

    Statements are module constants with named `bindparam`s; each is compiled the first time it runs."""

    def __init__(self, engine: AsyncEngine, url: str, pool_size: int, timeout: float) -> None:
        self.engine = engine
        self.postgres = engine.dialect.name == "postgresql"
        self._dsn = make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)
        self._pool_size = pool_size
        self._timeout = timeout
        self._pool: asyncpg.Pool | None = None
        self._starting = asyncio.Lock()
        self._compiled: dict[int, tuple[Executable, _Compiled]] = {}

    async def all(self, statement: Executable, **params: Any) -> Sequence[Row]:
        if not self.postgres:
            async with self.engine.connect() as connection:
                return cast(Sequence[Row], (await connection.execute(statement, params)).mappings().all())
        compiled = self._compile(statement)
        pool = self._pool or await self._start()
        args = compiled.arguments(params)
        try:
            async with pool.acquire(timeout=self._timeout) as connection:
                rows: list[Row] = await connection.fetch(compiled.sql, *args, timeout=self._timeout)
        except TimeoutError as exc:
            raise Unavailable("the database is slow to answer, try again", "database_slow") from exc
        return rows

    async def one(self, statement: Executable, **params: Any) -> Row | None:
        rows = await self.all(statement, **params)
        return rows[0] if rows else None

    def _compile(self, statement: Executable) -> _Compiled:
        known = self._compiled.get(id(statement))
        if known is not None and known[0] is statement:  # the statement is kept alive, so its id is its own
            return known[1]
        compiled = cast(SQLCompiler, cast(ClauseElement, statement).compile(dialect=self.engine.dialect))
        given = {name for name, bind in compiled.binds.items() if bind.required}
        if any(compiled.binds[name].expanding for name in given):
            raise TypeError("a hot read takes no expanding (IN) parameter: join, or compare with ANY")
        # constant IN lists are written out as parameters of their own once, here
        expanded = compiled.construct_expanded_state(dict.fromkeys(given))
        slots = tuple((name, name in given, expanded.parameters.get(name)) for name in expanded.positiontup or ())
        entry = _Compiled(expanded.statement, slots)
        self._compiled[id(statement)] = (statement, entry)
        return entry

    async def _start(self) -> asyncpg.Pool:
        async with self._starting:
            if self._pool is None:
                self._pool = await asyncpg.create_pool(self._dsn, min_size=1, max_size=self._pool_size,
                                                       init=_decode_json, reset=_no_reset,
                                                       command_timeout=self._timeout)
        return self._pool

    async def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            await pool.close()
