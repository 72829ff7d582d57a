"""Scheduling: the clinic's services, specialists' weekly schedules, materialised slots, the waitlist."""

from __future__ import annotations

import datetime as dt
from decimal import Decimal
from typing import Any
from uuid import UUID

from advanced_alchemy.types import GUID, DateTimeUTC
from sqlalchemy import Boolean, ForeignKey, Index, Integer, Numeric, String, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from app.db import Base, JsonDoc


class ClinicService(Base):
    """What can be booked: a direction's visit type with its length, price and format rules."""

    __tablename__ = "clinic_service"

    specialty: Mapped[str] = mapped_column(String(32), index=True)
    title: Mapped[str] = mapped_column(String(200))
    duration_minutes: Mapped[int] = mapped_column(Integer)
    price: Mapped[Decimal] = mapped_column(Numeric(10, 2))
    in_person_only: Mapped[bool] = mapped_column(Boolean, default=False)
    stage: Mapped[str] = mapped_column(String(16), default="single")  # first | second | single
    active: Mapped[bool] = mapped_column(Boolean, default=True)


class Schedule(Base):
    """A specialist's working week in their own zone; slots are generated from it up to the horizon."""

    __tablename__ = "schedule"

    specialist_id: Mapped[UUID] = mapped_column(GUID, ForeignKey("user_account.id", ondelete="CASCADE"),
                                                unique=True)
    timezone: Mapped[str] = mapped_column(String(64))
    slot_minutes: Mapped[int] = mapped_column(Integer)
    horizon_days: Mapped[int] = mapped_column(Integer)
    weekly: Mapped[list[dict[str, Any]]] = mapped_column(JsonDoc, default=list)
    breaks: Mapped[list[dict[str, Any]]] = mapped_column(JsonDoc, default=list)


class Slot(Base):
    """One bookable interval. Holding and booking are single conditional updates of this row."""

    __tablename__ = "slot"
    __table_args__ = (
        UniqueConstraint("specialist_id", "starts_at", name="uq_slot_specialist_start"),
        Index("ix_slot_free_by_time", "starts_at", "specialist_id"),
    )

    specialist_id: Mapped[UUID] = mapped_column(GUID, ForeignKey("user_account.id", ondelete="CASCADE"))
    starts_at: Mapped[dt.datetime] = mapped_column(DateTimeUTC(timezone=True))
    ends_at: Mapped[dt.datetime] = mapped_column(DateTimeUTC(timezone=True))
    consultation_id: Mapped[UUID | None] = mapped_column(GUID)  # set: booked
    hold_id: Mapped[UUID | None] = mapped_column(GUID)
    held_by: Mapped[UUID | None] = mapped_column(GUID)
    held_until: Mapped[dt.datetime | None] = mapped_column(DateTimeUTC(timezone=True))


class SpecialtyRule(Base):
    """Whom a direction serves: an age range (in whole years on the visit's day) and a sex; null is no limit."""

    __tablename__ = "specialty_rule"

    specialty: Mapped[str] = mapped_column(String(32), unique=True)
    min_age: Mapped[int | None] = mapped_column(Integer)
    max_age: Mapped[int | None] = mapped_column(Integer)
    sex: Mapped[str | None] = mapped_column(String(8))  # female | male


class WaitlistRequest(Base):
    __tablename__ = "waitlist_request"

    patient_id: Mapped[UUID] = mapped_column(GUID, ForeignKey("user_account.id", ondelete="CASCADE"), index=True)
    requested_by: Mapped[UUID] = mapped_column(GUID, ForeignKey("user_account.id", ondelete="CASCADE"))
    specialty: Mapped[str] = mapped_column(String(32), index=True)
    specialist_id: Mapped[UUID | None] = mapped_column(GUID, ForeignKey("user_account.id", ondelete="CASCADE"))
    note: Mapped[str] = mapped_column(String(1000), default="")
    status: Mapped[str] = mapped_column(String(16), default="open", index=True)  # open | resolved | withdrawn
    resolved_by: Mapped[UUID | None] = mapped_column(GUID)
    resolution: Mapped[str | None] = mapped_column(String(1000))
    notified_at: Mapped[dt.datetime | None] = mapped_column(DateTimeUTC(timezone=True))
