"""Free slots on the hot read path (app/reads.py): one specialist's in one statement, a direction's for the feed.

A slot is free when no consultation has it and no live hold (scheduling.service.is_free): the same condition
the hold and the claim test in their conditional updates, so a read never shows a slot those would refuse
for being taken, beyond the instant between the two.
"""

from __future__ import annotations

import datetime as dt
from typing import Any
from uuid import UUID

import msgspec
from sqlalchemy import String, and_, bindparam, cast, func, select
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.types import Uuid

from app import access
from app.accounts.models import User
from app.errors import NotVisible
from app.reads import Reads, Row
from app.scheduling.models import Slot
from app.scheduling.schemas import FeedSlotOut, SlotOut
from app.scheduling.service import is_free

MOST_SLOTS = 2000  # one specialist's answer
MOST_FEED_SLOTS = 5000  # a direction's feed

_now: Any = bindparam("now")
_window = and_(Slot.starts_at >= bindparam("since"), Slot.starts_at < bindparam("end"), is_free(_now))

# The specialist's account with their free slots in the window (a row without a slot when there is none, no
# row when there is no such account). The JSON lists come as their text, decoded once, not once a row.
FREE_SLOTS = (select(cast(User.roles, String).label("roles"), cast(User.specialties, String).label("specialties"),
                     Slot.id, Slot.starts_at, Slot.ends_at)
              .select_from(User).outerjoin(Slot, and_(Slot.specialist_id == User.id, _window))
              .where(User.id == bindparam("specialist_id"))
              .order_by(Slot.starts_at).limit(MOST_SLOTS))

STAFF = select(User.id, User.roles, User.specialties).where(User.is_staff.is_(True))
_FEED = select(Slot.id, Slot.specialist_id, Slot.starts_at, Slot.ends_at)
_FEED_ORDER = (Slot.starts_at, Slot.id)
# the specialists' ids as one array on PostgreSQL; an IN list SQLAlchemy expands on SQLite
FEED_POSTGRES = (_FEED.where(Slot.specialist_id == func.any(bindparam("ids", type_=ARRAY(Uuid))), _window)
                 .order_by(*_FEED_ORDER).limit(MOST_FEED_SLOTS))
FEED_EMBEDDED = (_FEED.where(Slot.specialist_id.in_(bindparam("ids", expanding=True)), _window)
                 .order_by(*_FEED_ORDER).limit(MOST_FEED_SLOTS))


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def is_specialist(roles: list[str], specialties: list[str]) -> bool:
    """A clinician with a direction (AccountService.specialist and .specialists say the same)."""
    return bool(specialties) and not access.SPECIALIST_ROLES.isdisjoint(roles)


async def free_slots(reads: Reads, specialist_id: UUID, start: dt.datetime, end: dt.datetime) -> list[SlotOut]:
    """The specialist's free slots starting in [start, end) and not yet begun, by time; 404 for no specialist."""
    now = utcnow()
    rows = await reads.all(FREE_SLOTS, specialist_id=specialist_id, since=max(start, now), end=end, now=now)
    if not rows or not is_specialist(msgspec.json.decode(rows[0]["roles"]),
                                     msgspec.json.decode(rows[0]["specialties"])):
        raise NotVisible("specialist not found")
    if rows[0]["id"] is None:
        return []
    return [SlotOut(id=r["id"], specialist_id=specialist_id, starts_at=r["starts_at"], ends_at=r["ends_at"])
            for r in rows]


async def feed(reads: Reads, specialty: str | None, start: dt.datetime, end: dt.datetime) -> bytes:
    """The partner feed's answer: the free slots of the direction's specialists (every one's without a
    direction), each with the specialist's directions, encoded once for the feed's cache."""
    specialists: dict[UUID, list[str]] = {}
    for row in await reads.all(STAFF):
        specialties = list(row["specialties"])
        if is_specialist(row["roles"], specialties) and (specialty is None or specialty in specialties):
            specialists[row["id"]] = specialties
    if not specialists:
        return msgspec.json.encode({"items": [], "next_cursor": None})
    now = utcnow()
    rows: list[Row] = list(await reads.all(FEED_POSTGRES if reads.postgres else FEED_EMBEDDED,
                                           ids=list(specialists), since=max(start, now), end=end, now=now))
    items = [FeedSlotOut(id=r["id"], specialist_id=r["specialist_id"], specialties=specialists[r["specialist_id"]],
                         starts_at=r["starts_at"], ends_at=r["ends_at"]) for r in rows]
    return msgspec.json.encode({"items": items, "next_cursor": None})
