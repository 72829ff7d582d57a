"""Where a group of chat sends is written: the few statements of ChatService's send rules, in two dialects.

PostgreSQL takes them through asyncpg directly: array parameters (unnest) make each statement one round trip
for any group size, with no ORM, statement compilation or greenlet switch on the way. A group then costs about
two fifths of the CPU it costs through SQLAlchemy (1.3 ms instead of 3.3 ms for a group of one, 1.9 instead of
4.6 for eight: bench/chat_writer.py), and a send's CPU is the chat's throughput (bench/chat.py).
Any other database (SQLite, the embedded profile) takes them through SQLAlchemy Core. The rules stay in one
place (app/chat/service.py, SendRules); only these statements exist twice, and the suite runs both.
"""

from __future__ import annotations

import contextlib
import datetime as dt
from collections import Counter
from collections.abc import AsyncIterator, Collection, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol
from uuid import UUID

import asyncpg
import msgspec
from sqlalchemy import Table, bindparam, delete, func, insert, select, update
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession
from uuid_utils.compat import uuid7

from app import outbox
from app.chat import streams
from app.chat.models import ChatWindow, Conversation, Message
from app.chat.schemas import MessageOut
from app.db import Database, dialect_insert
from app.documents.models import Document
from app.documents.schemas import AttachedOut


@dataclass(frozen=True, slots=True)
class Send:
    """One person's message on its way in, already checked for shape (see MessageIn)."""

    author_id: UUID
    conversation_id: UUID
    text: str
    client_id: str
    documents: tuple[AttachedOut, ...] = ()  # attachments, already checked (DocumentService.attachable)
    analyses: tuple[UUID, ...] = ()  # those of them that are analyses the patient's side uploaded


class PartyRow(NamedTuple):
    id: UUID
    specialist_id: UUID
    patient_id: UUID
    patient_has_login: bool
    guardian_id: UUID | None
    extended_until: dt.datetime | None
    planned_end: dt.datetime | None  # the latest end of the consultations holding it open


Push = tuple[UUID, list[str], dict[str, Any]]  # message id, recipients, payload
Events = Sequence[tuple[Collection[UUID], str, dict[str, Any]]]  # (recipients, type, data), in stream order


class SendStore(Protocol):
    pushed: bool  # outbox rows were written that no session's commit announces: the committer wakes the workers

    async def parties(self, conversation_ids: Sequence[UUID]) -> list[PartyRow]: ...

    async def insert_messages(self, messages: list[MessageOut]) -> set[UUID]:
        """Insert them; the ids of those written (a retry clashes with its first copy and is skipped)."""

    async def first_copy(self, send: Send) -> MessageOut: ...

    async def delete_messages(self, ids: list[UUID]) -> None: ...

    async def write_events(self, events: Events, pushes: list[Push], staged: streams.Staged) -> None:
        """Each event into each of its recipients' streams, numbered in list order and staged for publishing
        after the commit; the pushes into the outbox."""

    async def file_analyses(self, filed: list[tuple[UUID, UUID]]) -> None:
        """Analyses sent in a chat by the patient's side, (document, conversation): they note the conversation
        and enter the methodists' inbox (an analysis already there keeps its status)."""


PARTIES = select(
    Conversation.id, Conversation.specialist_id, Conversation.patient_id, Conversation.patient_has_login,
    Conversation.guardian_id, Conversation.extended_until,
    select(func.max(ChatWindow.ends_at)).where(ChatWindow.conversation_id == Conversation.id)
    .scalar_subquery().label("planned_end"),
).where(Conversation.id.in_(bindparam("ids", expanding=True)))


ATTACHED = list[AttachedOut]


def attached(documents: list[dict[str, Any]] | None) -> list[AttachedOut]:
    return msgspec.convert(documents, ATTACHED) if documents else []


def message_out(m: Message) -> MessageOut:
    return MessageOut(id=m.id, conversation_id=m.conversation_id, author_id=m.author_id, kind=m.kind, text=m.text,
                      document_ids=list(m.document_ids), client_id=m.client_id, created_at=m.created_at,
                      edited_at=m.edited_at, deleted=m.deleted_at is not None, documents=attached(m.documents))


def filed_update() -> Any:
    """The inbox's side of a chat send (SQLAlchemy Core; PG_FILE_ANALYSES is the same for asyncpg)."""
    table: Table = Document.__table__  # type: ignore[assignment]
    return update(table).where(table.c.id == bindparam("filed_document", type_=table.c.id.type)).values(
        conversation_id=func.coalesce(table.c.conversation_id,
                                      bindparam("filed_conversation", type_=table.c.conversation_id.type)),
        inbox_status=func.coalesce(table.c.inbox_status, "new"))


class SqlSendStore:
    """Through the request's (or the send queue's) SQLAlchemy session, on any database."""

    def __init__(self, session: AsyncSession) -> None:
        self.session = session
        self.pushed = False  # outbox.stage marks the session: its commit wakes the workers

    async def parties(self, conversation_ids: Sequence[UUID]) -> list[PartyRow]:
        rows = await self.session.execute(PARTIES, {"ids": list(conversation_ids)})
        return [PartyRow(*row) for row in rows]

    async def insert_messages(self, messages: list[MessageOut]) -> set[UUID]:
        if not messages:
            return set()
        table = Message.__table__
        written = await self.session.execute(
            dialect_insert(self.session)(table)
            .on_conflict_do_nothing(index_elements=["conversation_id", "author_id", "client_id"])
            .returning(table.c.id),
            [{"id": m.id, "conversation_id": m.conversation_id, "author_id": m.author_id, "kind": m.kind,
              "text": m.text, "document_ids": m.document_ids, "client_id": m.client_id,
              "documents": msgspec.to_builtins(m.documents), "created_at": m.created_at,
              "updated_at": m.created_at} for m in messages])
        return set(written.scalars().all())

    async def first_copy(self, send: Send) -> MessageOut:
        found = await self.session.scalar(select(Message).where(
            Message.conversation_id == send.conversation_id, Message.author_id == send.author_id,
            Message.client_id == send.client_id))
        assert found is not None
        return message_out(found)

    async def delete_messages(self, ids: list[UUID]) -> None:
        await self.session.execute(delete(Message).where(Message.id.in_(ids)))

    async def write_events(self, events: Events, pushes: list[Push], staged: streams.Staged) -> None:
        counts = streams.tally(events)
        if counts:
            numbered = streams.lay_out(events, counts, await streams.number(self.session, counts), staged)
            await self.session.execute(insert(streams.EVENTS), streams.event_rows(numbered))
        for message_id, recipients, payload in pushes:  # the session's commit wakes the outbox workers
            outbox.stage(self.session, "push", message_id, recipients, payload)

    async def file_analyses(self, filed: list[tuple[UUID, UUID]]) -> None:
        if filed:
            await self.session.execute(filed_update(), [{"filed_document": d, "filed_conversation": c}
                                                        for d, c in filed])


PG_PARTIES = """
SELECT c.id, c.specialist_id, c.patient_id, c.patient_has_login, c.guardian_id, c.extended_until,
       (SELECT max(w.ends_at) FROM chat_window w WHERE w.conversation_id = c.id) AS planned_end
FROM conversation c WHERE c.id = ANY($1::uuid[])"""
PG_INSERT_MESSAGES = """
INSERT INTO message (id, conversation_id, author_id, kind, text, document_ids, client_id, created_at, updated_at,
                     documents)
SELECT id, conversation_id, author_id, kind, text, document_ids, client_id, at, at, documents
FROM unnest($1::uuid[], $2::uuid[], $3::uuid[], $4::text[], $5::text[], $6::jsonb[], $7::text[],
            $8::timestamptz[], $9::jsonb[])
    AS m(id, conversation_id, author_id, kind, text, document_ids, client_id, at, documents)
ON CONFLICT (conversation_id, author_id, client_id) DO NOTHING
RETURNING id"""
PG_FIRST_COPY = """
SELECT id, conversation_id, author_id, kind, text, document_ids::text, client_id, created_at, edited_at, deleted_at,
       documents::text
FROM message WHERE conversation_id = $1 AND author_id = $2 AND client_id = $3"""
# One round trip for a group's streams, events and pushes. The streams move forward by each user's count ($1,
# $2), in user order, so two writers take the stream rows' locks in the same order and never deadlock; the k-th
# event of a user in the group ($4) takes position last - count + k; every data-modifying part runs whether
# or not the final SELECT reads it.
PG_WRITE_EVENTS = """
WITH counts AS (SELECT * FROM unnest($1::uuid[], $2::bigint[]) AS c(user_id, n)),
numbered AS (
    INSERT INTO user_stream (user_id, last_seq) SELECT user_id, n FROM counts ORDER BY user_id
    ON CONFLICT (user_id) DO UPDATE SET last_seq = user_stream.last_seq + excluded.last_seq
    RETURNING user_id, last_seq),
events AS (
    INSERT INTO user_event (recipient_id, seq, type, data, created_at)
    SELECT e.recipient_id, s.last_seq - c.n + e.k, e.type, e.data, $7
    FROM unnest($3::uuid[], $4::bigint[], $5::text[], $6::jsonb[]) AS e(recipient_id, k, type, data)
    JOIN numbered s ON s.user_id = e.recipient_id JOIN counts c ON c.user_id = e.recipient_id),
pushes AS (
    INSERT INTO outbox_event (id, type, aggregate_id, recipients, payload, created_at, updated_at)
    SELECT id, 'push', aggregate_id, recipients, payload, $7, $7
    FROM unnest($8::uuid[], $9::uuid[], $10::jsonb[], $11::jsonb[]) AS o(id, aggregate_id, recipients, payload))
SELECT user_id, last_seq FROM numbered"""
PG_FILE_ANALYSES = """
UPDATE document d SET conversation_id = coalesce(d.conversation_id, f.conversation_id),
                      inbox_status = coalesce(d.inbox_status, 'new')
FROM unnest($1::uuid[], $2::uuid[]) AS f(document_id, conversation_id) WHERE d.id = f.document_id"""


class HeldConnection:
    """One PostgreSQL connection a send writer keeps between its groups, so each group starts on a warm
    backend: the pool hands out its least recently used connection, whose backend has slept the longest, and
    on a busy machine waking it made a group's BEGIN its slowest statement. Dropped after any error; the next
    group connects again."""

    def __init__(self, database: Database) -> None:
        self.database = database
        self._connection: AsyncConnection | None = None

    async def driver(self) -> asyncpg.Connection:
        if self._connection is None:
            self._connection = await self.database.engine.connect()
        driver = (await self._connection.get_raw_connection()).driver_connection
        assert driver is not None
        return driver

    async def drop(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            with contextlib.suppress(Exception):  # a broken connection is discarded by the pool either way
                await connection.invalidate()
                await connection.close()


@asynccontextmanager
async def open_store(database: Database, statement_seconds: float = 5.0,
                     held: HeldConnection | None = None) -> AsyncIterator[SendStore]:
    """A store in a transaction of its own, committed when the block ends without an error; on PostgreSQL
    over `held` when given."""
    if held is not None and database.engine.dialect.name == "postgresql":
        driver = await held.driver()
        try:
            async with driver.transaction():
                yield PgSendStore(driver, statement_seconds)
        except BaseException:
            await held.drop()
            raise
    elif database.engine.dialect.name == "postgresql":
        async with database.engine.connect() as connection:
            driver = (await connection.get_raw_connection()).driver_connection
            assert driver is not None
            async with driver.transaction():
                yield PgSendStore(driver, statement_seconds)
    else:
        async with database.writer() as session:
            yield SqlSendStore(session)
            await session.commit()


def _json(value: Any) -> str:
    return msgspec.json.encode(value).decode()  # the engine's jsonb codec takes JSON text


class PgSendStore:
    """Straight through asyncpg, inside the transaction the caller opened on this connection.

    Each statement gives up after `timeout` seconds (a row lock held elsewhere, say): the group is refused
    with 503 and the writer goes on with the next one instead of every send in the process waiting."""

    def __init__(self, connection: asyncpg.Connection, timeout: float) -> None:
        self.connection = connection
        self.timeout = timeout
        self.pushed = False

    async def parties(self, conversation_ids: Sequence[UUID]) -> list[PartyRow]:
        return [PartyRow(*row) for row in await self.connection.fetch(PG_PARTIES, list(conversation_ids),
                                                                           timeout=self.timeout)]

    async def insert_messages(self, messages: list[MessageOut]) -> set[UUID]:
        if not messages:
            return set()
        rows = await self.connection.fetch(
            PG_INSERT_MESSAGES, [m.id for m in messages], [m.conversation_id for m in messages],
            [m.author_id for m in messages], [m.kind for m in messages], [m.text for m in messages],
            [_json(m.document_ids) for m in messages], [m.client_id for m in messages],
            [m.created_at for m in messages], [_json(m.documents) for m in messages], timeout=self.timeout)
        return {row[0] for row in rows}

    async def first_copy(self, send: Send) -> MessageOut:
        row = await self.connection.fetchrow(PG_FIRST_COPY, send.conversation_id, send.author_id, send.client_id,
                                             timeout=self.timeout)
        assert row is not None
        return MessageOut(id=row[0], conversation_id=row[1], author_id=row[2], kind=row[3], text=row[4],
                          document_ids=msgspec.json.decode(row[5]), client_id=row[6], created_at=row[7],
                          edited_at=row[8], deleted=row[9] is not None,
                          documents=msgspec.json.decode(row[10], type=ATTACHED))

    async def delete_messages(self, ids: list[UUID]) -> None:
        await self.connection.execute("DELETE FROM message WHERE id = ANY($1::uuid[])", ids, timeout=self.timeout)

    async def write_events(self, events: Events, pushes: list[Push], staged: streams.Staged) -> None:
        counts = streams.tally(events)
        if not counts:
            return  # nothing accepted, so nothing to push either
        recipients, ordinals, types, data = [], [], [], []
        seen: Counter[UUID] = Counter()
        for people, type_, payload in events:
            encoded = _json(payload)  # the people of a message share its data: encoded once
            for person in people:
                seen[person] += 1
                recipients.append(person)
                ordinals.append(seen[person])
                types.append(type_)
                data.append(encoded)
        users = list(counts)
        rows = await self.connection.fetch(
            PG_WRITE_EVENTS, users, [counts[u] for u in users], recipients, ordinals, types, data,
            dt.datetime.now(dt.UTC), [uuid7() for _ in pushes], [p[0] for p in pushes],
            [_json(p[1]) for p in pushes], [_json(p[2]) for p in pushes], timeout=self.timeout)
        streams.lay_out(events, counts, {row[0]: row[1] for row in rows}, staged)  # the numbers the SQL gave
        self.pushed = bool(pushes)

    async def file_analyses(self, filed: list[tuple[UUID, UUID]]) -> None:
        if filed:
            await self.connection.execute(PG_FILE_ANALYSES, [d for d, _ in filed], [c for _, c in filed],
                                          timeout=self.timeout)
