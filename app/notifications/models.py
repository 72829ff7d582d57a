"""What the notifications worker keeps: each delivery of an outbox row to a device or phone, and reminders due."""

from __future__ import annotations

import datetime as dt
from uuid import UUID

from advanced_alchemy.types import GUID, DateTimeUTC
from sqlalchemy import ForeignKey, Index, Integer, String, UniqueConstraint, text
from sqlalchemy.orm import Mapped, mapped_column

from app.db import Base

# what a push is about, for staff opt-ins (`push_topics`): patients get every push
TOPICS = ("chat", "consultations", "notices", "alerts", "reminders")
STAFF_TOPICS = ("chat", "alerts")  # a staff member's default: their chats, and alerts to their role (a low rating)


class OutboxDelivery(Base):
    """One target of one outbox row (a device, or a phone for SMS) and how its last attempt ended: a retry of
    the row resends only to targets not yet `sent` (or `gone`, `failed`)."""

    __tablename__ = "outbox_delivery"
    __table_args__ = (UniqueConstraint("event_id", "target", name="uq_outbox_delivery_event_target"),)

    event_id: Mapped[UUID] = mapped_column(GUID, ForeignKey("outbox_event.id", ondelete="CASCADE"))
    target: Mapped[str] = mapped_column(String(64))  # "push:<device id>" | "sms:<user id>"
    user_id: Mapped[UUID] = mapped_column(GUID)
    state: Mapped[str] = mapped_column(String(16))  # sent | retry | gone | failed
    attempts: Mapped[int] = mapped_column(Integer, default=1)
    sent_at: Mapped[dt.datetime | None] = mapped_column(DateTimeUTC(timezone=True))


class Reminder(Base):
    """A reminder due before a consultation, one per consultation and offset: the worker stages it into the
    outbox when it is due (once: the unique key and the claim), booking creates it, a cancel drops it."""

    __tablename__ = "reminder"
    __table_args__ = (
        UniqueConstraint("consultation_id", "offset_minutes", name="uq_reminder_consultation_offset"),
        Index("ix_reminder_due", "due_at", postgresql_where=text("staged_at IS NULL"),
              sqlite_where=text("staged_at IS NULL")),
    )

    consultation_id: Mapped[UUID] = mapped_column(GUID, ForeignKey("consultation.id", ondelete="CASCADE"))
    offset_minutes: Mapped[int] = mapped_column(Integer)
    due_at: Mapped[dt.datetime] = mapped_column(DateTimeUTC(timezone=True))
    staged_at: Mapped[dt.datetime | None] = mapped_column(DateTimeUTC(timezone=True))
