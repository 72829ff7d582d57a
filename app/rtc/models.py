"""Calls: one row per call, from ringing to its end (the API owns call state; the SFU owns only media)."""

from __future__ import annotations

import datetime as dt
from uuid import UUID

from advanced_alchemy.types import GUID, DateTimeUTC
from sqlalchemy import ForeignKey, Index, String, text
from sqlalchemy.orm import Mapped, mapped_column

from app.db import Base

LIVE = "state <> 'ended'"
RINGING = "state = 'ringing'"


class Call(Base):
    __tablename__ = "call"
    __table_args__ = (
        # the database's own guarantee: one live (ringing or active) call per consultation, whoever races
        Index("uq_call_live_consultation", "consultation_id", unique=True,
              postgresql_where=text(LIVE), sqlite_where=text(LIVE)),
        # the ring timeout's "nearest deadline" and its conditional expiry read only ringing calls
        Index("ix_call_ringing_deadline", "ring_deadline", postgresql_where=text(RINGING), sqlite_where=text(RINGING)),
        # a dead SFU node's calls
        Index("ix_call_live_node", "node", postgresql_where=text(LIVE), sqlite_where=text(LIVE)),
    )

    consultation_id: Mapped[UUID] = mapped_column(GUID, ForeignKey("consultation.id", ondelete="RESTRICT"),
                                                  index=True)
    conversation_id: Mapped[UUID] = mapped_column(GUID)  # its chat: the people, the missed-call message
    specialist_id: Mapped[UUID] = mapped_column(GUID, ForeignKey("user_account.id", ondelete="RESTRICT"))
    patient_id: Mapped[UUID] = mapped_column(GUID, ForeignKey("user_account.id", ondelete="RESTRICT"))
    state: Mapped[str] = mapped_column(String(16))  # ringing | active | ended
    end_reason: Mapped[str | None] = mapped_column(String(16))  # completed | declined | missed | cancelled | failed
    ring_deadline: Mapped[dt.datetime] = mapped_column(DateTimeUTC(timezone=True))  # unanswered by then: missed
    started_at: Mapped[dt.datetime | None] = mapped_column(DateTimeUTC(timezone=True))  # accepted
    ended_at: Mapped[dt.datetime | None] = mapped_column(DateTimeUTC(timezone=True))
    node: Mapped[str] = mapped_column(String(300))  # the SFU node holding the call's room
    accepted_by: Mapped[UUID | None] = mapped_column(GUID)  # the patient or the guardian who answered
