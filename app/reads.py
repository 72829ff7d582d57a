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
from sqlalchemy import JSON, ClauseElement, Dialect, Executable, make_url
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.dml import Insert

from app.errors import Unavailable

Row = Mapping[str, Any]


class Compiled:
    """A statement as asyncpg takes it: its SQL, and per positional parameter either the caller's name for it
    or, for a value written into the statement (a constant, an IN list), that value. JSON parameters go as
    their text, as the connections' JSON codecs take them."""

    __slots__ = ("slots", "sql")

    def __init__(self, sql: str, slots: tuple[tuple[str, bool, Any, bool], ...]) -> None:
        self.sql, self.slots = sql, slots  # (name, given by the caller, constant value, JSON)

    def arguments(self, params: Mapping[str, Any]) -> list[Any]:
        try:
            return [(_json_text(params[name]) if json else params[name]) if given else value
                    for name, given, value, json in self.slots]
        except KeyError as exc:
            raise TypeError(f"the statement needs the parameter {exc}") from None


def _json_text(value: Any) -> str | None:
    return None if value is None else msgspec.json.encode(value).decode()


_COMPILED: dict[tuple[int, tuple[str, ...]], tuple[Executable, Compiled]] = {}


def compile_once(statement: Executable, dialect: Dialect, params: Mapping[str, Any] | None = None) -> Compiled:
    """A statement (a module constant) as asyncpg takes it, compiled the first time it runs; an INSERT once
    per set of columns given (`params`). The hot writes (app/writes.py) take their statements this way too."""
    columns = tuple(params) if params is not None and isinstance(statement, Insert) else ()
    known = _COMPILED.get((id(statement), columns))
    if known is not None and known[0] is statement:  # the statement is kept alive, so its id is its own
        return known[1]
    compiled = cast(SQLCompiler, cast(ClauseElement, statement).compile(
        dialect=dialect, column_keys=list(columns) if columns else None))
    if compiled.insert_prefetch or compiled.update_prefetch:  # defaults SQLAlchemy computes per execution
        missing = [c.key for c in (*compiled.insert_prefetch, *compiled.update_prefetch)]
        raise TypeError(f"a statement run on asyncpg is given every column with a default: {missing}")
    given = {name for name, bind in compiled.binds.items() if bind.required}
    if any(compiled.binds[name].expanding for name in given):
        raise TypeError("a statement run on asyncpg takes no expanding (IN) parameter: join, or compare with ANY")
    # constant IN lists are written out as parameters of their own once, here
    expanded = compiled.construct_expanded_state(dict.fromkeys(given))
    json = {name for name, bind in compiled.binds.items() if isinstance(bind.type, JSON)}
    slots = tuple((name, name in given, expanded.parameters.get(name), name in json)
                  for name in expanded.positiontup or ())
    entry = Compiled(expanded.statement, slots)
    _COMPILED[(id(statement), columns)] = (statement, entry)
    return entry


async def _no_reset(_: asyncpg.Connection) -> None:
    """A read runs in autocommit and sets nothing: there is nothing to reset when it goes back to the pool."""


async def _decode_json(connection: asyncpg.Connection) -> None:
    for name in ("json", "jsonb"):  # parameters arrive as JSON text (Compiled.arguments), rows are decoded
        await connection.set_type_codec(name, schema="pg_catalog", format="text", encoder=str,
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

    async def all(self, statement: Executable, **params: Any) -> Sequence[Row]:
        if not self.postgres:
            async with self.engine.connect() as connection:
                return cast(Sequence[Row], (await connection.execute(statement, params)).mappings().all())
        compiled = compile_once(statement, self.engine.dialect)
        args = compiled.arguments(params)
        try:
            pool = self._pool or await self._start()
            async with pool.acquire() as connection:  # the server ends a statement past the timeout, which
                rows: list[Row] = await connection.fetch(compiled.sql, *args)  # frees it; no client-side timer
        except asyncpg.QueryCanceledError as exc:
            raise Unavailable("the database is slow to answer, try again", "database_slow") from exc
        except (OSError, asyncpg.PostgresConnectionError) as exc:  # down or restarting
            raise Unavailable("the database is not reachable, try again", "database_unavailable") from exc
        return rows

    async def one(self, statement: Executable, **params: Any) -> Row | None:
        rows = await self.all(statement, **params)
        return rows[0] if rows else None

    async def _start(self) -> asyncpg.Pool:
        async with self._starting:
            if self._pool is None:
                milliseconds = str(max(1, round(self._timeout * 1000)))
                self._pool = await asyncpg.create_pool(self._dsn, min_size=1, max_size=self._pool_size,
                                                       init=_decode_json, reset=_no_reset,
                                                       server_settings={"statement_timeout": milliseconds})
        return self._pool

    async def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            await pool.close()
