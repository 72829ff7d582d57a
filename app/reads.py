"""Hot reads: one statement each, written once in SQLAlchemy Core, run without a session or the ORM.

A signed-in GET spent most of its CPU in the session, the identity map and result processing, not in the
database. Here a statement is compiled once per dialect; on PostgreSQL it runs straight on a pooled asyncpg
connection (asyncpg prepares it once per connection), on SQLite (the embedded profile) through SQLAlchemy
Core on the same engine as everything else. Rows come back as mappings keyed by column label, so an answer is
built as `SomeOut(**row)`, and secrecy masks are applied to those answers as data (app/access.py).

The connections are the readers' own (`ReadConnections`), in autocommit: a read leaves no transaction, so a
connection goes back as it is, with no reset round trip.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
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


async def _decode_json(connection: asyncpg.Connection) -> None:
    for name in ("json", "jsonb"):  # parameters arrive as JSON text (Compiled.arguments), rows are decoded
        await connection.set_type_codec(name, schema="pg_catalog", format="text", encoder=str,
                                        decoder=msgspec.json.decode)


class ReadConnections:
    """Up to `size` asyncpg connections, opened when first needed, each used by one read at a time.

    asyncpg's Pool spends about 80 µs of CPU on an acquire and release (a proxy object, a shielded task for the
    release), as much as the read itself; a read only needs an idle connection and to hand it back. A caller
    finding none waits in line and is handed one directly by the next release. A connection found closed (the
    server went away) is dropped and another opened in its place. A read cancelled mid-statement leaves its
    connection usable: asyncpg cancels the statement on the server before the next one starts."""

    def __init__(self, connect: Callable[[], Awaitable[asyncpg.Connection]], size: int) -> None:
        self._connect = connect
        self._size = size
        self._idle: deque[asyncpg.Connection] = deque()
        self._waiting: deque[asyncio.Future[asyncpg.Connection | None]] = deque()
        self._count = 0  # open or opening
        self._closed = False

    async def acquire(self) -> asyncpg.Connection:
        while True:
            if self._closed:
                raise asyncpg.InterfaceError("the read connections are closed")
            while self._idle:
                connection = self._idle.pop()  # the most recently used: its caches are warm
                if not connection.is_closed():
                    return connection
                self._count -= 1
            if self._count < self._size:
                self._count += 1
                try:
                    return await self._connect()
                except BaseException:
                    self._count -= 1
                    self._hand_over(None)  # a caller in line may try to open one in turn
                    raise
            turn: asyncio.Future[asyncpg.Connection | None] = asyncio.get_running_loop().create_future()
            self._waiting.append(turn)
            try:
                connection = await turn
            except asyncio.CancelledError:
                if turn.done() and not turn.cancelled():  # handed one just as the caller went away
                    if (handed := turn.result()) is not None:
                        self.release(handed)
                    else:
                        self._hand_over(None)
                else:
                    self._waiting.remove(turn)
                raise
            if connection is not None:
                return connection
            # None: a place was freed (a connection closed, or opening one failed): try again

    def release(self, connection: asyncpg.Connection) -> None:
        if self._closed or connection.is_closed():
            self._count -= 1
            if not connection.is_closed():
                connection.terminate()
            self._hand_over(None)
        elif not self._hand_over(connection):
            self._idle.append(connection)

    def _hand_over(self, connection: asyncpg.Connection | None) -> bool:
        while self._waiting:
            turn = self._waiting.popleft()
            if not turn.done():
                turn.set_result(connection)
                return True
        return False

    async def close(self) -> None:
        self._closed = True
        idle, self._idle = list(self._idle), deque()
        self._count -= len(idle)
        while self._waiting:
            turn = self._waiting.popleft()
            if not turn.done():
                turn.set_result(None)  # they find the connections closed
        await asyncio.gather(*(c.close() for c in idle), return_exceptions=True)


class Reads:
    """Runs read statements: `await reads.all(STATEMENT, uid=...)` → a list of rows, `one` → a row or None.

    Statements are module constants with named `bindparam`s; each is compiled the first time it runs."""

    def __init__(self, engine: AsyncEngine, url: str, pool_size: int, timeout: float) -> None:
        self.engine = engine
        self.postgres = engine.dialect.name == "postgresql"
        self._dsn = make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)
        self._pool_size = pool_size
        self._timeout = timeout
        self._connections: ReadConnections | None = None

    async def all(self, statement: Executable, **params: Any) -> Sequence[Row]:
        if not self.postgres:
            async with self.engine.connect() as connection:
                return cast(Sequence[Row], (await connection.execute(statement, params)).mappings().all())
        compiled = compile_once(statement, self.engine.dialect)
        args = compiled.arguments(params)
        connections = self._connections or self._start()
        try:
            connection = await connections.acquire()
            try:  # the server ends a statement past the timeout, which frees it; no client-side timer
                rows: list[Row] = await connection.fetch(compiled.sql, *args)
            finally:
                connections.release(connection)
        except asyncpg.QueryCanceledError as exc:
            raise Unavailable("the database is slow to answer, try again", "database_slow") from exc
        except (OSError, asyncpg.PostgresConnectionError) as exc:  # down or restarting
            raise Unavailable("the database is not reachable, try again", "database_unavailable") from exc
        return rows

    async def one(self, statement: Executable, **params: Any) -> Row | None:
        rows = await self.all(statement, **params)
        return rows[0] if rows else None

    def _start(self) -> ReadConnections:
        milliseconds = str(max(1, round(self._timeout * 1000)))

        async def connect() -> asyncpg.Connection:
            connection = await asyncpg.connect(self._dsn, server_settings={"statement_timeout": milliseconds})
            await _decode_json(connection)
            return connection

        self._connections = ReadConnections(connect, self._pool_size)
        return self._connections

    async def close(self) -> None:
        connections, self._connections = self._connections, None
        if connections is not None:
            await connections.close()
