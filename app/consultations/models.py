"""Consultations: the visit itself, conclusion with analysis orders, and rating (payments: app/payments)."""

from __future__ import annotations

import datetime as dt
from typing import Any
from uuid import UUID

from advanced_alchemy.types import GUID, DateTimeUTC
from sqlalchemy import Boolean, Date, ForeignKey, Index, Integer, String, Text, text
from sqlalchemy.orm import Mapped, mapped_column

from app.db import Base, JsonDoc

# statuses that hold a slot; a cancelled visit gives its slot back
ACTIVE_STATUSES = ("pending_confirmation", "confirmed", "in_progress", "completed", "no_show")


class Consultation(Base):
    __tablename__ = "consultation"
    __table_args__ = (
        # the database's own guarantee, beside the slot's conditional update: one live visit per slot
        Index("uq_consultation_live_slot", "slot_id", unique=True,
              postgresql_where=text("status <> 'cancelled'"), sqlite_where=text("status <> 'cancelled'")),
        Index("ix_consultation_specialist_time", "specialist_id", "starts_at"),
        Index("ix_consultation_patient_time", "patient_id", "starts_at"),
    )

    patient_id: Mapped[UUID] = mapped_column(GUID, ForeignKey("user_account.id", ondelete="RESTRICT"))
    specialist_id: Mapped[UUID] = mapped_column(GUID, ForeignKey("user_account.id", ondelete="RESTRICT"))
    service_id: Mapped[UUID] = mapped_column(GUID, ForeignKey("clinic_service.id", ondelete="RESTRICT"))
    slot_id: Mapped[UUID] = mapped_column(GUID, ForeignKey("slot.id", ondelete="RESTRICT"))
    specialty: Mapped[str] = mapped_column(String(32))
    starts_at: Mapped[dt.datetime] = mapped_column(DateTimeUTC(timezone=True))
    ends_at: Mapped[dt.datetime] = mapped_column(DateTimeUTC(timezone=True))
    format: Mapped[str] = mapped_column(String(16))  # in_person | online
    status: Mapped[str] = mapped_column(String(32), index=True)
    paid: Mapped[bool] = mapped_column(Boolean, default=False)
    booked_by: Mapped[UUID] = mapped_column(GUID)
    cancel_reason: Mapped[str | None] = mapped_column(String(500))
    started_at: Mapped[dt.datetime | None] = mapped_column(DateTimeUTC(timezone=True))
    completed_at: Mapped[dt.datetime | None] = mapped_column(DateTimeUTC(timezone=True))
    conversation_id: Mapped[UUID | None] = mapped_column(GUID)  # the chat feature fills it


class Conclusion(Base):
    __tablename__ = "conclusion"

    consultation_id: Mapped[UUID] = mapped_column(GUID, ForeignKey("consultation.id", ondelete="RESTRICT"),
                                                  unique=True)
    patient_id: Mapped[UUID] = mapped_column(GUID, ForeignKey("user_account.id", ondelete="RESTRICT"), index=True)
    author_id: Mapped[UUID] = mapped_column(GUID, ForeignKey("user_account.id", ondelete="RESTRICT"))
    author_role: Mapped[str] = mapped_column(String(32))  # decides who may read it (app/access.py)
    diagnoses: Mapped[list[dict[str, Any]]] = mapped_column(JsonDoc, default=list)
    recommendations: Mapped[str] = mapped_column(Text, default="")
    treatment: Mapped[str] = mapped_column(Text, default="")
    follow_up: Mapped[dict[str, Any] | None] = mapped_column(JsonDoc)


class AnalysisOrder(Base):
    __tablename__ = "analysis_order"

    conclusion_id: Mapped[UUID] = mapped_column(GUID, ForeignKey("conclusion.id", ondelete="CASCADE"), index=True)
    patient_id: Mapped[UUID] = mapped_column(GUID, ForeignKey("user_account.id", ondelete="RESTRICT"), index=True)
    name: Mapped[str] = mapped_column(String(300))
    status: Mapped[str] = mapped_column(String(16), default="ordered")  # ordered | sample_taken | ready
    expected_ready_on: Mapped[dt.date | None] = mapped_column(Date)


class Rating(Base):
    __tablename__ = "rating"

    consultation_id: Mapped[UUID] = mapped_column(GUID, ForeignKey("consultation.id", ondelete="RESTRICT"),
                                                  unique=True)
    specialist_id: Mapped[UUID] = mapped_column(GUID, index=True)
    score: Mapped[int] = mapped_column(Integer)
    comment: Mapped[str | None] = mapped_column(String(2000))
