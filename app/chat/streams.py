"""Per-user event streams: every realtime event is a row in its recipient's stream, numbered 1, 2, 3 ...

Numbers are handed out under the recipient's stream-row lock and written in the same transaction as the
change, so a user's events commit in number order: a client that resumes after N gets N+1, N+2 ... exactly
once, and a live socket can tell a gap (and fill it from here) from a duplicate (and drop it).
"""

from __future__ import annotations

import datetime as dt
from collections import Counter
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any
from uuid import UUID

import msgspec
from sqlalchemy import Table, func, insert, select
from sqlalchemy.ext.asyncio import AsyncSession

from app.chat.models import UserEvent, UserStream
from app.db import dialect_insert
from app.events import STREAM_EVENTS


@dataclass(frozen=True, slots=True)
class Event:
    recipient_id: UUID
    seq: int
    type: str
    data: dict[str, Any] | msgspec.Raw  # Raw: as it came over the bus, spliced into the socket's frame as is


class Staged:
    """Events of one transaction, to publish once it has committed."""

    def __init__(self) -> None:
        self.events: list[Event] = []

    def encode(self) -> bytes:
        return msgspec.json.encode([[e.recipient_id, e.seq, e.type, e.data] for e in self.events])


WIRE = msgspec.json.Decoder(list[tuple[UUID, int, str, msgspec.Raw]])


def decode(raw: bytes) -> list[Event]:
    """A published batch; each event's data stays JSON text (every socket that sends it splices it into its
    frame: nothing is decoded into dicts and encoded again)."""
    return [Event(recipient, seq, type_, data) for recipient, seq, type_, data in WIRE.decode(raw)]


PAGE = 1000
STREAMS: Table = UserStream.__table__  # type: ignore[assignment]
EVENTS: Table = UserEvent.__table__  # type: ignore[assignment]


async def append(session: AsyncSession, staged: Staged, recipients: set[UUID], type_: str,
                 data: dict[str, Any]) -> None:
    """Add one event to each recipient's stream."""
    await append_many(session, staged, [(recipients, type_, data)])


async def append_many(session: AsyncSession, staged: Staged,
                      events: Sequence[tuple[Collection[UUID], str, dict[str, Any]]]) -> None:
    """Add events to their recipients' streams, in list order: two statements whatever the numbers."""
    unknown = {type_ for _, type_, _ in events} - STREAM_EVENTS.keys()
    if unknown:  # a programming error: every type is documented (app/events.py, the AsyncAPI document)
        raise ValueError(f"undocumented stream event types: {sorted(unknown)}")
    counts = tally(events)
    if not counts:
        return
    numbered = lay_out(events, counts, await number(session, counts), staged)
    await session.execute(insert(EVENTS), event_rows(numbered))


def tally(events: Sequence[tuple[Collection[UUID], str, dict[str, Any]]]) -> dict[UUID, int]:
    """How many of the events each recipient gets."""
    return dict(Counter(r for recipients, _, _ in events for r in recipients))


async def number(session: AsyncSession, counts: dict[UUID, int]) -> dict[UUID, int]:
    """Move each user's stream forward by their count, in one statement; each stream's last position after.

    The upsert takes the stream rows in user order, so two writers never deadlock."""
    # Core statements on the tables: the ORM's bulk-insert machinery costs more than the database here
    stream = STREAMS
    upsert = dialect_insert(session)(stream)
    statement = upsert.on_conflict_do_update(
        index_elements=[stream.c.user_id], set_={"last_seq": stream.c.last_seq + upsert.excluded.last_seq},
    ).returning(stream.c.user_id, stream.c.last_seq)
    # one statement for all rows (SQLAlchemy batches them), compiled once and cached whatever the count
    numbered = await session.execute(statement, [{"user_id": u, "last_seq": n} for u, n in sorted(counts.items())])
    return {user: last for user, last in numbered.all()}


def lay_out(events: Sequence[tuple[Collection[UUID], str, dict[str, Any]]], counts: dict[UUID, int],
            last: dict[UUID, int], staged: Staged) -> list[Event]:
    """Give each event its position in each recipient's stream (the counts end at `last`), in list order,
    and stage them for publishing."""
    next_seq = {user: last[user] - n + 1 for user, n in counts.items()}
    numbered = []
    for recipients, type_, data in events:
        for recipient in recipients:
            seq = next_seq[recipient]
            next_seq[recipient] = seq + 1
            numbered.append(Event(recipient, seq, type_, data))
    staged.events.extend(numbered)
    return numbered


def event_rows(events: list[Event]) -> list[dict[str, Any]]:
    now = dt.datetime.now(dt.UTC)
    return [{"recipient_id": e.recipient_id, "seq": e.seq, "type": e.type, "data": e.data, "created_at": now}
            for e in events]


async def last_seq(session: AsyncSession, user_id: UUID) -> int:
    return await session.scalar(select(func.coalesce(func.max(UserStream.last_seq), 0))
                                .where(UserStream.user_id == user_id)) or 0



async def after(session: AsyncSession, user_id: UUID, seq: int, up_to: int | None = None,
                limit: int = PAGE) -> list[Event]:
    query = (select(UserEvent.seq, UserEvent.type, UserEvent.data)
             .where(UserEvent.recipient_id == user_id, UserEvent.seq > seq).order_by(UserEvent.seq).limit(limit))
    if up_to is not None:
        query = query.where(UserEvent.seq <= up_to)
    return [Event(user_id, r.seq, r.type, r.data) for r in await session.execute(query)]


def staged_for(session: AsyncSession) -> Staged:
    """The events this session's transaction has written; published after it commits."""
    staged = session.info.get("staged_events")
    if staged is None:
        staged = session.info["staged_events"] = Staged()
    return staged
