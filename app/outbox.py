"""The outbox: domain events written in the same transaction as the change that caused them.

A dispatcher (the notifications and realtime work) publishes rows and marks them sent, so a crash between
the commit and the publish loses nothing.
"""

from __future__ import annotations

import datetime as dt
from typing import Any
from uuid import UUID

from advanced_alchemy.types import GUID, DateTimeUTC
from sqlalchemy import Index, String
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Mapped, mapped_column

from app.db import Base, JsonDoc


class OutboxEvent(Base):
    __tablename__ = "outbox_event"
    __table_args__ = (Index("ix_outbox_event_pending", "dispatched_at", "created_at"),)

    type: Mapped[str] = mapped_column(String(64))  # the realtime event type, e.g. consultation.updated
    aggregate_id: Mapped[UUID | None] = mapped_column(GUID)
    recipients: Mapped[list[str]] = mapped_column(JsonDoc, default=list)  # user ids, or a role as "role:admin"
    payload: Mapped[dict[str, Any]] = mapped_column(JsonDoc, default=dict)
    dispatched_at: Mapped[dt.datetime | None] = mapped_column(DateTimeUTC(timezone=True))


def stage(session: AsyncSession, type_: str, aggregate_id: UUID | None, recipients: list[str],
          payload: dict[str, Any]) -> None:
    """Add an event to the current transaction; it commits or rolls back with the change."""
    session.add(OutboxEvent(type=type_, aggregate_id=aggregate_id, recipients=recipients, payload=payload))
