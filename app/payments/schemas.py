"""What crosses the wire for payments: a consultation's payments, the provider's notifications, refunds."""

from __future__ import annotations

import datetime as dt
from decimal import Decimal
from typing import Annotated, Literal
from uuid import UUID

import msgspec
from msgspec import Meta

from app.schemas import Out


class PaymentOut(Out):
    id: UUID
    consultation_id: UUID
    status: str  # pending | succeeded | canceled | duplicate | void
    amount: Decimal
    currency: str
    method: str
    provider: str | None  # None: taken at the front desk
    confirmation_url: str | None  # where the payer confirms an online payment
    created_at: dt.datetime


class NotificationObject(msgspec.Struct):
    """Only the id is read: everything else is fetched back from the provider."""

    id: Annotated[str, Meta(min_length=1, max_length=64)]


class NotificationIn(msgspec.Struct):
    """YooKassa's notification body; unknown fields are allowed (the provider adds them over time)."""

    type: Literal["notification"]
    event: Annotated[str, Meta(min_length=1, max_length=64)]
    object: NotificationObject


class NotificationOut(Out):
    outcome: Literal["processed", "ignored"]


class RefundOut(Out):
    id: UUID
    consultation_id: UUID
    payment_id: UUID
    amount: Decimal
    currency: str
    status: str  # due | pending | succeeded | failed
    provider: str | None  # None: the front desk gives it back
    attempts: int
    last_error: str | None
    resolved_at: dt.datetime | None
    created_at: dt.datetime
