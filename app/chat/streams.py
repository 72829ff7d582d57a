"""Per-user event streams: every realtime event is a row in its recipient's stream, numbered 1, 2, 3 ...

Numbers are handed out under the recipient's stream-row lock and written in the same transaction as the
change, so a user's events commit in number order: a client that resumes after N gets N+1, N+2 ... exactly
once, and a live socket can tell a gap (and fill it from here) from a duplicate (and drop it).
"""

from __future__ import annotations

import datetime as dt
from collections import Counter
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any
from uuid import UUID

import msgspec
from sqlalchemy import Table, func, insert, select
from sqlalchemy.ext.asyncio import AsyncSession

from app.chat.models import UserEvent, UserStream
from app.db import dialect_insert


@dataclass(frozen=True, slots=True)
class Event:
    recipient_id: UUID
    seq: int
    type: str
    data: dict[str, Any]


class Staged:
    """Events of one transaction, to publish once it has committed."""

    def __init__(self) -> None:
        self.events: list[Event] = []

    def encode(self) -> bytes:
        return msgspec.json.encode([[str(e.recipient_id), e.seq, e.type, e.data] for e in self.events])


def decode(raw: bytes) -> list[Event]:
    return [Event(UUID(r), seq, type_, data) for r, seq, type_, data in msgspec.json.decode(raw)]


PAGE = 1000
STREAMS: Table = UserStream.__table__  # type: ignore[assignment]
EVENTS: Table = UserEvent.__table__  # type: ignore[assignment]


async def append(session: AsyncSession, staged: Staged, recipients: set[UUID], type_: str,
                 data: dict[str, Any]) -> None:
    """Add one event to each recipient's stream."""
    await append_many(session, staged, [(recipients, type_, data)])


async def append_many(session: AsyncSession, staged: Staged,
                      events: list[tuple[Collection[UUID], str, dict[str, Any]]]) -> None:
    """Add events to their recipients' streams, in list order: two statements whatever the numbers.

    Each stream moves forward once by its number of new events; the upsert takes the stream rows in
    recipient order, so two writers never deadlock."""
    counts = Counter(r for recipients, _, _ in events for r in recipients)
    if not counts:
        return
    # Core statements on the tables: the ORM's bulk-insert machinery costs more than the database here
    stream = STREAMS
    upsert = dialect_insert(session)(stream)
    statement = upsert.on_conflict_do_update(
        index_elements=[stream.c.user_id], set_={"last_seq": stream.c.last_seq + upsert.excluded.last_seq},
    ).returning(stream.c.user_id, stream.c.last_seq)
    # one statement for all rows (SQLAlchemy batches them), compiled once and cached whatever the count
    numbered = await session.execute(statement, [{"user_id": r, "last_seq": n} for r, n in sorted(counts.items())])
    next_seq = {user: last - counts[user] + 1 for user, last in numbered.all()}
    now = dt.datetime.now(dt.UTC)
    rows = []
    for recipients, type_, data in events:
        for recipient in recipients:
            seq = next_seq[recipient]
            next_seq[recipient] = seq + 1
            rows.append({"recipient_id": recipient, "seq": seq, "type": type_, "data": data, "created_at": now})
            staged.events.append(Event(recipient, seq, type_, data))
    await session.execute(insert(EVENTS), rows)


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
