"""Accounts: people (patients, dependents, staff), one-time codes, refresh tokens, push devices."""

from __future__ import annotations

import datetime as dt
from typing import Any
from uuid import UUID

from advanced_alchemy.types import GUID, DateTimeUTC
from sqlalchemy import Boolean, Date, ForeignKey, Index, Integer, String
from sqlalchemy.orm import Mapped, mapped_column

from app.db import Base, JsonDoc


class User(Base):
    """A person: a patient with a phone, a dependent with none (acted for by a guardian), or staff."""

    __tablename__ = "user_account"

    phone: Mapped[str | None] = mapped_column(String(16), unique=True)  # E.164; dependents have none
    full_name: Mapped[str] = mapped_column(String(200), default="")
    birth_date: Mapped[dt.date | None] = mapped_column(Date)
    sex: Mapped[str | None] = mapped_column(String(8))  # female | male; some directions serve one
    timezone: Mapped[str] = mapped_column(String(64), default="Europe/Moscow")
    roles: Mapped[list[str]] = mapped_column(JsonDoc, default=list)
    specialties: Mapped[list[str]] = mapped_column(JsonDoc, default=list)
    is_staff: Mapped[bool] = mapped_column(Boolean, default=False, index=True)
    active: Mapped[bool] = mapped_column(Boolean, default=True)  # a deactivated account cannot sign in
    questionnaire: Mapped[dict[str, Any]] = mapped_column(JsonDoc, default=dict)
    guardian_id: Mapped[UUID | None] = mapped_column(
        GUID, ForeignKey("user_account.id", ondelete="RESTRICT"), index=True
    )
    relation: Mapped[str | None] = mapped_column(String(32))  # the guardian's relation to this dependent
    legal_basis: Mapped[str | None] = mapped_column(String(500))  # the document that grants guardianship
    # pushes: no non-urgent push between these local times ("HH:MM", in `timezone`; held until the end)
    quiet_hours_start: Mapped[str | None] = mapped_column(String(5))
    quiet_hours_end: Mapped[str | None] = mapped_column(String(5))
    # the push topics a staff member opted into (None: the default, app/notifications/models.py STAFF_TOPICS);
    # patients get every push
    push_topics: Mapped[list[str] | None] = mapped_column(JsonDoc)


class OtpCode(Base):
    """The one live login code of a phone; only its HMAC is kept."""

    __tablename__ = "otp_code"

    phone: Mapped[str] = mapped_column(String(16), unique=True)
    code_hash: Mapped[str] = mapped_column(String(64))
    expires_at: Mapped[dt.datetime] = mapped_column(DateTimeUTC(timezone=True))
    attempts: Mapped[int] = mapped_column(Integer, default=0)


class RefreshToken(Base):
    """One link of a refresh chain; a family is one login. Spending a spent link revokes its family."""

    __tablename__ = "refresh_token"
    __table_args__ = (Index("ix_refresh_token_family", "family_id"),)

    user_id: Mapped[UUID] = mapped_column(GUID, ForeignKey("user_account.id", ondelete="CASCADE"), index=True)
    family_id: Mapped[UUID] = mapped_column(GUID)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    expires_at: Mapped[dt.datetime] = mapped_column(DateTimeUTC(timezone=True))
    used_at: Mapped[dt.datetime | None] = mapped_column(DateTimeUTC(timezone=True))
    revoked_at: Mapped[dt.datetime | None] = mapped_column(DateTimeUTC(timezone=True))


class Device(Base):
    """Where pushes reach a user: one row per app install (push token), with an iOS VoIP token if any."""

    __tablename__ = "device"

    user_id: Mapped[UUID] = mapped_column(GUID, ForeignKey("user_account.id", ondelete="CASCADE"), index=True)
    platform: Mapped[str] = mapped_column(String(16))
    push_token: Mapped[str] = mapped_column(String(4096))
    push_token_hash: Mapped[str] = mapped_column(String(64), unique=True)  # tokens are long: index a hash
    voip_token: Mapped[str | None] = mapped_column(String(4096))


class AccessRevocation(Base):
    """Access that ended before its tokens expire: one login (family_id) or every token of a user issued
    before `not_before`. Kept for an access token's lifetime: a starting process loads the recent ones."""

    __tablename__ = "access_revocation"

    user_id: Mapped[UUID] = mapped_column(GUID, ForeignKey("user_account.id", ondelete="CASCADE"))
    family_id: Mapped[UUID | None] = mapped_column(GUID)  # the login ended; None: every login of the user
    not_before: Mapped[dt.datetime] = mapped_column(DateTimeUTC(timezone=True), index=True)
