"""Payments of consultations (at the desk or through a provider) and the refunds they owe."""

from __future__ import annotations

import datetime as dt
from decimal import Decimal
from uuid import UUID

from advanced_alchemy.types import GUID, DateTimeUTC
from sqlalchemy import ForeignKey, Index, Integer, Numeric, String, text
from sqlalchemy.orm import Mapped, mapped_column

from app.db import Base

# payment.status: a desk payment is succeeded at once; an online one is pending until the provider confirms it
PENDING, SUCCEEDED, CANCELED, DUPLICATE = "pending", "succeeded", "canceled", "duplicate"
# void: a payment recorded before the rules that the rules reject (by the visit's own patient or guardian, or
# not for the service's price); it never made a visit paid (the 0004 migration)
VOID = "void"
# refund.status: due until given back (by the provider, or by hand at the desk)
DUE, REFUND_PENDING, REFUNDED, FAILED = "due", "pending", "succeeded", "failed"


class Payment(Base):
    __tablename__ = "payment"
    __table_args__ = (
        # the database's own guarantee: one successful payment per consultation, one open online attempt
        Index("uq_payment_succeeded", "consultation_id", unique=True,
              postgresql_where=text("status = 'succeeded'"), sqlite_where=text("status = 'succeeded'")),
        Index("uq_payment_pending", "consultation_id", unique=True,
              postgresql_where=text("status = 'pending'"), sqlite_where=text("status = 'pending'")),
    )

    consultation_id: Mapped[UUID] = mapped_column(GUID, ForeignKey("consultation.id", ondelete="RESTRICT"),
                                                  index=True)
    amount: Mapped[Decimal] = mapped_column(Numeric(10, 2))
    currency: Mapped[str] = mapped_column(String(3), default="RUB")
    method: Mapped[str] = mapped_column(String(16))  # card | cash | transfer (desk) | online (provider)
    reference: Mapped[str] = mapped_column(String(128), unique=True)  # the payment system's id: idempotency
    recorded_by: Mapped[UUID] = mapped_column(GUID)  # the desk clerk, or the payer who started it online
    status: Mapped[str] = mapped_column(String(16), default=SUCCEEDED)
    provider: Mapped[str | None] = mapped_column(String(32))  # None: taken at the desk
    provider_payment_id: Mapped[str | None] = mapped_column(String(64), unique=True)
    confirmation_url: Mapped[str | None] = mapped_column(String(2000))


class Refund(Base):
    __tablename__ = "refund"
    __table_args__ = (Index("ix_refund_status_next", "status", "next_attempt_at"),)

    consultation_id: Mapped[UUID] = mapped_column(GUID, ForeignKey("consultation.id", ondelete="RESTRICT"),
                                                  index=True)
    payment_id: Mapped[UUID] = mapped_column(GUID, ForeignKey("payment.id", ondelete="RESTRICT"),
                                             unique=True)  # a payment is given back once
    amount: Mapped[Decimal] = mapped_column(Numeric(10, 2))
    currency: Mapped[str] = mapped_column(String(3), default="RUB")
    status: Mapped[str] = mapped_column(String(16), default=DUE)
    provider: Mapped[str | None] = mapped_column(String(32))  # None: the desk gives the money back
    provider_refund_id: Mapped[str | None] = mapped_column(String(64))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[dt.datetime | None] = mapped_column(DateTimeUTC(timezone=True))
    last_error: Mapped[str | None] = mapped_column(String(300))
    resolved_by: Mapped[UUID | None] = mapped_column(GUID)
    resolved_at: Mapped[dt.datetime | None] = mapped_column(DateTimeUTC(timezone=True))
