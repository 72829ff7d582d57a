"""Where a group of chat sends is written: the few statements of ChatService's send rules, in two dialects.

PostgreSQL takes them through asyncpg directly: array parameters (unnest) make each statement one round trip
for any group size, with no ORM, statement compilation or greenlet switch on the way. A group then costs about
two fifths of the CPU it costs through SQLAlchemy (1.3 ms instead of 3.3 ms for a group of one, 1.9 instead of
4.6 for eight: bench/chat_writer.py), and a send's CPU is the chat's throughput (bench/chat.py).
Any other database (SQLite, the embedded profile) takes them through SQLAlchemy Core. The rules stay in one
place (app/chat/service.py, SendRules); only these statements exist twice, and the suite runs both.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol
from uuid import UUID

import asyncpg
import msgspec
from sqlalchemy import Table, bindparam, delete, func, insert, select, update
from sqlalchemy.ext.asyncio import AsyncSession
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


class SendStore(Protocol):
    async def parties(self, conversation_ids: Sequence[UUID]) -> list[PartyRow]: ...

    async def insert_messages(self, messages: list[MessageOut]) -> set[UUID]:
        """Insert them; the ids of those written (a retry clashes with its first copy and is skipped)."""

    async def first_copy(self, send: Send) -> MessageOut: ...

    async def delete_messages(self, ids: list[UUID]) -> None: ...

    async def number_streams(self, counts: dict[UUID, int]) -> dict[UUID, int]:
        """Move each user's stream forward by their count; each stream's last position after."""

    async def insert_events(self, events: list[streams.Event]) -> None: ...

    async def stage_pushes(self, pushes: list[Push]) -> None: ...

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

    async def number_streams(self, counts: dict[UUID, int]) -> dict[UUID, int]:
        return await streams.number(self.session, counts)

    async def insert_events(self, events: list[streams.Event]) -> None:
        await self.session.execute(insert(streams.EVENTS), streams.event_rows(events))

    async def stage_pushes(self, pushes: list[Push]) -> None:
        for message_id, recipients, payload in pushes:
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
# rows in user order, so two writers take the stream rows' locks in the same order and never deadlock
PG_NUMBER_STREAMS = """
INSERT INTO user_stream (user_id, last_seq)
SELECT user_id, n FROM unnest($1::uuid[], $2::bigint[]) AS s(user_id, n) ORDER BY user_id
ON CONFLICT (user_id) DO UPDATE SET last_seq = user_stream.last_seq + excluded.last_seq
RETURNING user_id, last_seq"""
PG_INSERT_EVENTS = """
INSERT INTO user_event (recipient_id, seq, type, data, created_at)
SELECT recipient_id, seq, type, data, $5 FROM unnest($1::uuid[], $2::bigint[], $3::text[], $4::jsonb[])
    AS e(recipient_id, seq, type, data)"""
PG_INSERT_OUTBOX = """
INSERT INTO outbox_event (id, type, aggregate_id, recipients, payload, created_at, updated_at)
SELECT id, 'push', aggregate_id, recipients, payload, $4, $4
FROM unnest($1::uuid[], $2::uuid[], $3::jsonb[], $5::jsonb[]) AS o(id, aggregate_id, recipients, payload)"""
PG_FILE_ANALYSES = """
UPDATE document d SET conversation_id = coalesce(d.conversation_id, f.conversation_id),
                      inbox_status = coalesce(d.inbox_status, 'new')
FROM unnest($1::uuid[], $2::uuid[]) AS f(document_id, conversation_id) WHERE d.id = f.document_id"""


@asynccontextmanager
async def open_store(database: Database, statement_seconds: float = 5.0) -> AsyncIterator[SendStore]:
    """A store in a transaction of its own, committed when the block ends without an error."""
    if database.engine.dialect.name == "postgresql":
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

    async def number_streams(self, counts: dict[UUID, int]) -> dict[UUID, int]:
        users = list(counts)
        rows = await self.connection.fetch(PG_NUMBER_STREAMS, users, [counts[u] for u in users],
                                           timeout=self.timeout)
        return {row[0]: row[1] for row in rows}

    async def insert_events(self, events: list[streams.Event]) -> None:
        if events:
            encoded: dict[int, str] = {}  # the people of a message share its data dict: encode it once
            for e in events:
                if id(e.data) not in encoded:
                    encoded[id(e.data)] = _json(e.data)
            data = [encoded[id(e.data)] for e in events]
            await self.connection.execute(
                PG_INSERT_EVENTS, [e.recipient_id for e in events], [e.seq for e in events],
                [e.type for e in events], data, dt.datetime.now(dt.UTC), timeout=self.timeout)

    async def stage_pushes(self, pushes: list[Push]) -> None:
        if pushes:
            await self.connection.execute(
                PG_INSERT_OUTBOX, [uuid7() for _ in pushes], [p[0] for p in pushes],
                [_json(p[1]) for p in pushes], dt.datetime.now(dt.UTC), [_json(p[2]) for p in pushes],
                timeout=self.timeout)

    async def file_analyses(self, filed: list[tuple[UUID, UUID]]) -> None:
        if filed:
            await self.connection.execute(PG_FILE_ANALYSES, [d for d, _ in filed], [c for _, c in filed],
                                          timeout=self.timeout)
