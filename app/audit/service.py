"""The audit log of staff reads of medical data: one append-only table, one service.

Callers build an `AuditContext` from the request (`audit_context`) and call `AuditLog.record`;
reads by the patient (or guardian) of their own data record nothing.

A read costs the request an append to a list in memory: a task writes what accumulated every
AUDIT_FLUSH_SECONDS (or as soon as AUDIT_BATCH_ROWS are waiting) in one statement (COPY on PostgreSQL, a
multi-row INSERT on SQLite) on a connection of its own, so a read on the autocommit reader session never waits
for, nor fails over, its audit row. Rows the database refuses stay queued and are retried with a growing
pause; the lifespan's exit writes what is left before the database closes, so a clean shutdown loses none.
A crash loses at most the rows of the last flush interval.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import functools
import logging
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, get_args
from uuid import UUID

import uuid_utils
from litestar import Request
from litestar.datastructures import State
from prometheus_client import Counter, Gauge
from sqlalchemy import and_, insert, or_, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncSession

from app.access import Role, Viewer
from app.audit.models import audit_event
from app.clientaddr import client_address
from app.db import Database
from app.errors import Invalid
from app.observability import request_id_var
from app.timeparams import parse_aware

log = logging.getLogger("app.audit")

Action = Literal["card.read", "conclusion.read", "document.read", "document.download", "documents.list",
                 "chat.read"]
ACTIONS: tuple[str, ...] = get_args(Action)
MAX_BACKOFF_SECONDS = 30.0  # the longest pause between tries while the database refuses the rows
STATEMENT_ROWS = 1000  # rows per statement: bounds one statement's size
COLUMNS = tuple(column.name for column in audit_event.columns)
ADDRESS_CACHE = 4096  # distinct (peer, X-Forwarded-For) pairs whose client address is remembered

WRITTEN = Counter("clinic_audit_rows_written_total", "Audit rows written to the database")
WRITE_FAILURES = Counter("clinic_audit_write_failures_total",
                         "Audit writes the database refused (their rows stay queued and are retried)")
DROPPED = Counter("clinic_audit_rows_dropped_total",
                  "Audit rows lost: the queue was full (AUDIT_MAX_PENDING), recording failed, or shutdown could "
                  "not write them")
PENDING = Gauge("clinic_audit_rows_pending", "Audit rows recorded and not yet written")


@dataclass(frozen=True, slots=True)
class AuditContext:
    """Who reads, and from where: what every row records beside its target."""

    actor: Viewer
    request_id: str | None
    ip: str | None


def staff_roles(viewer: Viewer) -> list[str]:
    """The roles that make a caller staff (any but patient), as a row records them."""
    return sorted(str(role) for role in viewer.roles if role != Role.PATIENT)


@functools.lru_cache(maxsize=256)
def staff_role_text(roles: frozenset[Role]) -> str:
    """`staff_roles` as the row's comma-separated column, empty for a caller without a staff role; the same few
    role sets come back on every read, so each is worked out once."""
    return ",".join(sorted(str(role) for role in roles if role != Role.PATIENT))


def row_values(row: tuple[Any, ...]) -> dict[str, Any]:
    """A queued row as an INSERT's parameters. The queue keeps the id as uuid_utils made it (a tenth of the
    cost of a `uuid.UUID`; COPY takes its bytes as they are); SQLAlchemy's GUID wants the standard type."""
    values = dict(zip(COLUMNS, row, strict=True))
    if not isinstance(values["id"], uuid.UUID):
        values["id"] = uuid.UUID(bytes=values["id"].bytes)
    return values


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class AuditLog:
    """Held in `app.state.audit`, one per process. Without a database (or with `enabled` off, which exists only
    to measure what auditing costs) it records nothing."""

    def __init__(self, database: Database | None = None, *, enabled: bool = True, flush_seconds: float = 0.2,
                 batch_rows: int = 500, max_pending: int = 100_000) -> None:
        self.database = database
        self.enabled = enabled and database is not None
        self.flush_seconds = flush_seconds
        self.batch_rows = max(1, batch_rows)
        self.max_pending = max_pending
        self._pending: list[tuple[Any, ...]] = []
        self._wake = asyncio.Event()
        self._lock = asyncio.Lock()  # one flush at a time: the task's and an explicit one never write a row twice
        self._task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping = False
        self._overflowing = False
        # the client address of a (peer, X-Forwarded-For) pair: the same few come back on every read, and parsing
        # them (app/clientaddr.py) costs more than the rest of a record
        self._addresses: dict[tuple[Any, ...], str] = {}

    @property
    def pending(self) -> int:
        return len(self._pending)

    def record(self, ctx: AuditContext, action: str, target_type: str, target_id: UUID,
               patient_id: UUID | None, *, own: bool = False) -> None:
        """One row: `action` is card.read, conclusion.read, document.read, document.download, documents.list or
        chat.read. Never raises into the read it records; never lost on a clean shutdown.

        Nothing is recorded for a caller without a staff role, for a patient reading their own data, nor when
        the caller says the read is `own` (a guardian's of a dependent: the caller knows that relation). A member
        of staff who is also a patient reads their own card unrecorded, as any patient does: the log watches
        reads of other people's secrets."""
        try:
            if not self.enabled or own:
                return
            roles = staff_role_text(ctx.actor.roles)
            if not roles or patient_id == ctx.actor.id:
                return
            if len(self._pending) >= self.max_pending:
                DROPPED.inc()
                if not self._overflowing:  # one line per overflow, not one per read
                    self._overflowing = True
                    log.error("audit queue full: rows are being dropped", extra={"pending": len(self._pending)})
                return
            self._pending.append((uuid_utils.uuid7(), utcnow(), ctx.actor.id, roles, action, target_type, target_id,
                                  patient_id, ctx.request_id, ctx.ip))  # in COLUMNS order
            if len(self._pending) >= self.batch_rows:
                self._wake.set()
        except Exception:  # the read goes on; the loss is counted and logged
            DROPPED.inc()
            log.exception("audit row not recorded", extra={"audit_action": action})

    def address(self, request: Request[Any, Any, Any]) -> str:
        """The request's client address (app/clientaddr.py), remembered per (peer, X-Forwarded-For): what it
        depends on besides the settings, which are this app's for the log's life."""
        client = request.scope.get("client")
        key = (client[0] if client else None,
               *(value for name, value in request.scope["headers"] if name == b"x-forwarded-for"))
        known = self._addresses.get(key)
        if known is None:
            known = client_address(request, request.app.state["settings"])
            if len(self._addresses) >= ADDRESS_CACHE:
                self._addresses.clear()
            self._addresses[key] = known
        return known

    # --- writing ---------------------------------------------------------------------------------

    def start(self) -> None:
        """The task that writes the queue (the lifespan starts it, and ends it with `close`)."""
        if self.enabled and self._task is None:
            self._stopping = False
            self._loop = asyncio.get_running_loop()
            self._task = asyncio.create_task(self._run())

    async def flush(self) -> bool:
        """Write every row recorded so far; False when the database refused them (they stay queued).

        Awaited on another thread's loop (a test client's), it runs on the app's: its connections live there."""
        home = self._loop
        if home is not None and home.is_running() and home is not asyncio.get_running_loop():
            return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(self._flush(), home))
        return await self._flush()

    async def _flush(self) -> bool:
        if self.database is None:
            return True
        async with self._lock:
            while self._pending:
                batch = self._pending[:STATEMENT_ROWS]
                try:
                    try:
                        await self._write(batch)
                    except Exception:  # e.g. a COPY that committed but whose answer was lost: its rows exist
                        log.warning("audit batch refused; writing it again, skipping rows already there")
                        await self._write(batch, skip_written=True)
                except Exception:
                    WRITE_FAILURES.inc()
                    PENDING.set(len(self._pending))
                    log.exception("audit rows not written; kept to retry", extra={"pending": len(self._pending)})
                    return False
                del self._pending[:len(batch)]  # rows only ever join at the end: these are the ones written
                WRITTEN.inc(len(batch))
            self._overflowing = False
            PENDING.set(0)
            return True

    async def _write(self, batch: list[tuple[Any, ...]], skip_written: bool = False) -> None:
        """One statement for the batch. `skip_written`: an INSERT that passes over ids already in the table, so
        a batch that was written once (its answer lost) never blocks the queue behind it."""
        assert self.database is not None
        async with self.database.engine.connect() as conn:
            if skip_written:
                dialect = postgresql if conn.dialect.name == "postgresql" else sqlite
                await conn.execute(dialect.insert(audit_event).on_conflict_do_nothing(index_elements=["id"]),
                                   [row_values(row) for row in batch])
                await conn.commit()
            elif conn.dialect.name == "postgresql":  # COPY: a few microseconds a row, a tenth of an INSERT's
                raw = await conn.get_raw_connection()
                await raw.driver_connection.copy_records_to_table(  # type: ignore[union-attr]
                    audit_event.name, records=batch, columns=COLUMNS)
            else:
                await conn.execute(insert(audit_event), [row_values(row) for row in batch])
                await conn.commit()

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        delay = self.flush_seconds
        while not self._stopping:
            deadline = loop.time() + delay
            while not self._stopping and (remaining := deadline - loop.time()) > 0:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(remaining):
                        await self._wake.wait()
                self._wake.clear()
                if delay == self.flush_seconds:
                    break  # healthy: a full batch goes at once; while failing, only the pause's end retries
            if self._stopping:
                break
            try:
                delay = self.flush_seconds if await self.flush() else min(max(delay, 0.5) * 2, MAX_BACKOFF_SECONDS)
            except Exception:  # never end the loop: the next interval tries again
                log.exception("audit flush failed")

    async def close(self, attempts: int = 3) -> None:
        """Stop the task (never mid-statement: it finishes its write) and write what is left."""
        self._stopping = True
        self._wake.set()
        if self._task is not None:
            try:  # never raises into the shutdown: what follows it (the database's close) must still run
                await self._task
            except Exception:
                log.exception("audit writer ended with an error")
            self._task = None
        for attempt in range(attempts):
            if await self.flush():
                return
            if attempt + 1 < attempts:
                await asyncio.sleep(0.5)
        lost = len(self._pending)
        DROPPED.inc(lost)
        log.error("audit rows lost at shutdown: the database refused them", extra={"rows": lost})


def audit_context(request: Request[Any, Any, Any], audit: AuditLog | None = None) -> AuditContext:
    """The caller of this request as the audit log records them."""
    viewer = request.scope["user"]
    ip = (audit or request.app.state["audit"]).address(request)
    return AuditContext(actor=viewer, request_id=request_id_var.get(), ip=ip)


async def provide_audit(state: State) -> AuditLog:
    audit: AuditLog = state["audit"]
    return audit


class AuditTrail:
    """One request's way into the audit log, handed to the service that decides what a read revealed and whose.

    The context (who, request id, address) is built only for a read that is recorded: a patient's reads (most
    reads) cost nothing here."""

    __slots__ = ("_ctx", "_request", "log")

    def __init__(self, log: AuditLog, request: Request[Any, Any, Any] | None = None,
                 ctx: AuditContext | None = None) -> None:
        self.log = log
        self._request = request
        self._ctx = ctx

    @property
    def ctx(self) -> AuditContext:
        if self._ctx is None:
            assert self._request is not None
            self._ctx = audit_context(self._request, self.log)
        return self._ctx

    def read(self, action: Action, target_type: str, target_id: UUID, patient_id: UUID | None, *,
             own: bool = False) -> None:
        if own or not self.log.enabled:
            return
        if self._ctx is None and self._request is not None:
            viewer = self._request.scope.get("user")
            if not isinstance(viewer, Viewer) or patient_id == viewer.id or not staff_role_text(viewer.roles):
                return  # nothing a caller without a staff role (or reading their own) reads is recorded
        self.log.record(self.ctx, action, target_type, target_id, patient_id, own=own)


def audit_trail(request: Request[Any, Any, Any]) -> AuditTrail:
    # `state[...]`, not `state.audit`: the attribute form first fails an ordinary lookup (microseconds per read)
    return AuditTrail(request.app.state["audit"], request)


# --- reading the log (admins) ----------------------------------------------------------------------


def parse_audit_cursor(cursor: str | None) -> tuple[dt.datetime, UUID] | None:
    if cursor is None:
        return None
    at, _, ident = cursor.partition("|")
    try:
        return parse_aware(at), UUID(ident)
    except (Invalid, ValueError) as exc:  # only ever one of our next_cursor values
        raise Invalid("the cursor is not one this list gave out", "cursor_invalid") from exc


@dataclass(frozen=True, slots=True)
class EventPage:
    rows: Sequence[Any]
    next_cursor: str | None


class AuditQueries:
    """The admin's view of the log: filtered, newest first, a page at a time."""

    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def events(self, *, patient_id: UUID | None, actor_id: UUID | None, action: str | None, limit: int,
                     cursor: tuple[dt.datetime, UUID] | None) -> EventPage:
        t = audit_event.c
        query = select(audit_event)
        if patient_id is not None:
            query = query.where(t.patient_id == patient_id)
        if actor_id is not None:
            query = query.where(t.actor_id == actor_id)
        if action is not None:
            query = query.where(t.action == action)
        if cursor is not None:
            at, ident = cursor
            query = query.where(or_(t.at < at, and_(t.at == at, t.id < ident)))
        rows = (await self.session.execute(query.order_by(t.at.desc(), t.id.desc()).limit(limit + 1))).all()
        more = len(rows) > limit
        rows = rows[:limit]
        last = rows[-1] if more else None
        return EventPage(rows=rows, next_cursor=f"{last.at.isoformat()}|{last.id}" if last is not None else None)
