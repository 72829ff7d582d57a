"""The outbox: domain events written in the same transaction as the change that caused them.

The notifications worker (app/notifications/worker.py) claims due rows, sends the pushes and SMS they mean and
marks them dispatched, so a crash between the commit and the send loses nothing. A transaction that staged rows
wakes the workers once it has committed (`on_commit`), and they poll slowly as well.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from typing import Any
from uuid import UUID

from advanced_alchemy.types import GUID, DateTimeUTC
from sqlalchemy import Index, Integer, String, event, func, text
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Mapped, Session, mapped_column

from app.db import Base, JsonDoc

STAGED = "outbox_staged"  # session.info key: this transaction added outbox rows
PENDING = "dispatched_at IS NULL AND failed_at IS NULL"


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class OutboxEvent(Base):
    __tablename__ = "outbox_event"
    __table_args__ = (
        Index("ix_outbox_event_pending", "dispatched_at", "created_at"),
        # the claim: pending rows by when they are next due (a claimed row's lease is its next due time)
        Index("ix_outbox_event_due", "next_attempt_at", postgresql_where=text(PENDING), sqlite_where=text(PENDING)),
    )

    type: Mapped[str] = mapped_column(String(64))  # the realtime event type, e.g. consultation.updated
    aggregate_id: Mapped[UUID | None] = mapped_column(GUID)
    recipients: Mapped[list[str]] = mapped_column(JsonDoc, default=list)  # user ids, or a role as "role:admin"
    payload: Mapped[dict[str, Any]] = mapped_column(JsonDoc, default=dict)
    dispatched_at: Mapped[dt.datetime | None] = mapped_column(DateTimeUTC(timezone=True))
    # delivery state (the worker's): claims so far, when it is next due (a retry's backoff, a hold for quiet
    # hours, or the end of a claim's lease), who holds it, and the give-up
    attempts: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    next_attempt_at: Mapped[dt.datetime] = mapped_column(DateTimeUTC(timezone=True), default=utcnow,
                                                         server_default=func.now())
    lease_until: Mapped[dt.datetime | None] = mapped_column(DateTimeUTC(timezone=True))
    lease_owner: Mapped[str | None] = mapped_column(String(64))
    failed_at: Mapped[dt.datetime | None] = mapped_column(DateTimeUTC(timezone=True))
    last_error: Mapped[str | None] = mapped_column(String(500))


def stage(session: AsyncSession, type_: str, aggregate_id: UUID | None, recipients: list[str],
          payload: dict[str, Any]) -> None:
    """Add an event to the current transaction; it commits or rolls back with the change."""
    session.add(OutboxEvent(type=type_, aggregate_id=aggregate_id, recipients=recipients, payload=payload))
    session.info[STAGED] = True


# --- waking the workers after a commit -----------------------------------------------------------

_listeners: list[Callable[[], None]] = []


def on_commit(listener: Callable[[], None]) -> Callable[[], None]:
    """Call `listener` (cheap, non-blocking) after each commit that staged outbox rows; returns the undo."""
    _listeners.append(listener)
    return lambda: _listeners.remove(listener) if listener in _listeners else None


def committed() -> None:
    """Rows were committed by a path that bypasses `stage` (raw SQL): wake the workers as a commit would."""
    for listener in list(_listeners):
        listener()


@event.listens_for(Session, "after_commit")
def _after_commit(session: Session) -> None:
    # a flag left by a rolled-back transaction only costs a spurious wake-up at the next commit
    if session.info.pop(STAGED, False):
        committed()
