"""Reminders before consultations: rows due at a time, staged into the outbox by the worker when they are due.

Booking creates them (`schedule`), moving a consultation moves them (`move`), ending it drops them (`drop`). One
row per consultation and offset (a unique key), and staging marks the row in the same transaction that writes its
outbox row, under a lock other workers skip: a reminder is staged once, however many workers run or restart.
"""

from __future__ import annotations

import datetime as dt
import re
from uuid import UUID

from sqlalchemy import delete, select, update
from sqlalchemy.ext.asyncio import AsyncSession
from uuid_utils.compat import uuid7

from app import outbox
from app.consultations.models import Consultation
from app.db import insert_ignoring_duplicates
from app.notifications.models import Reminder
from app.settings import Settings

UNITS = {"m": 1, "h": 60, "d": 24 * 60}
OFFSET = re.compile(r"^\s*(\d+)\s*([mhd])\s*$")
LIVE = ("pending_confirmation", "confirmed")  # a visit still ahead: in progress or ended ones need no reminder


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def offsets(settings: Settings) -> list[int]:
    """REMINDER_OFFSETS ("24h,1h", "30m", "2d") in minutes, largest first; empty: no reminders."""
    minutes = set()
    for item in settings.reminder_offsets.split(","):
        if not item.strip():
            continue
        found = OFFSET.match(item.lower())
        if found is None:
            raise ValueError(f"REMINDER_OFFSETS: {item!r} is not like 24h, 30m or 2d")
        minutes.add(int(found[1]) * UNITS[found[2]])
    return sorted(minutes, reverse=True)


async def schedule(session: AsyncSession, settings: Settings, consultation_id: UUID, starts_at: dt.datetime) -> int:
    """The reminders of a booked consultation; offsets already past are skipped. Returns how many."""
    now = utcnow()
    rows = [{"id": uuid7(), "consultation_id": consultation_id, "offset_minutes": m,
             "due_at": starts_at - dt.timedelta(minutes=m), "created_at": now, "updated_at": now}
            for m in offsets(settings) if starts_at - dt.timedelta(minutes=m) > now]
    return await insert_ignoring_duplicates(session, Reminder, rows)


async def move(session: AsyncSession, settings: Settings, consultation_id: UUID, starts_at: dt.datetime) -> int:
    """The consultation moved: its reminders follow it (those already sent are due again for the new time)."""
    await drop(session, consultation_id)
    return await schedule(session, settings, consultation_id, starts_at)


async def drop(session: AsyncSession, consultation_id: UUID) -> None:
    """Cancelled or over: no reminder of it goes out (one already staged is dropped by the worker: it checks)."""
    await session.execute(delete(Reminder).where(Reminder.consultation_id == consultation_id))


async def stage_due(session: AsyncSession, now: dt.datetime, limit: int = 500) -> int:
    """Write the reminders due now into the outbox (type `reminder`, for the patient) and mark them staged, in
    the caller's transaction. The mark is a conditional UPDATE (over rows locked with SKIP LOCKED on PostgreSQL):
    a reminder another worker is staging, or has staged, is not staged again."""
    unstaged = (Reminder.staged_at.is_(None), Reminder.due_at <= now)
    batch = (select(Reminder.id).where(*unstaged).order_by(Reminder.due_at).limit(limit)
             .with_for_update(skip_locked=True).cte("batch").prefix_with("MATERIALIZED"))  # evaluated once
    taken = (await session.execute(
        update(Reminder).where(Reminder.id == batch.c.id, *unstaged)
        .values(staged_at=now, updated_at=now)
        .returning(Reminder.consultation_id, Reminder.offset_minutes)
        .execution_options(synchronize_session=False))).all()
    if not taken:
        return 0
    visits = {v.id: v for v in (await session.execute(
        select(Consultation.id, Consultation.patient_id, Consultation.starts_at, Consultation.status)
        .where(Consultation.id.in_({t.consultation_id for t in taken})))).all()}
    for consultation_id, offset_minutes in taken:
        visit = visits.get(consultation_id)
        if visit is not None and visit.status in LIVE and visit.starts_at > now:
            outbox.stage(session, "reminder", consultation_id, [str(visit.patient_id)],
                         {"starts_at": visit.starts_at.isoformat(), "offset_minutes": offset_minutes})
    return len(taken)
