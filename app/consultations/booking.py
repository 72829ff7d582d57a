"""The statements of a booking, built once, and the queue of one process's bookers of one slot.

A booking is a handful of round trips in one transaction (app/writes.py): what it is checked against, read
with the patient's row lock; the slot's conditional claim, which decides between racers; the patient's other
visits, read after the claim; then the visit and what it brings (conversation, reminders, outbox, events).
A racer that loses the claim has written nothing: the claim is its first write.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import weakref
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any
from uuid import UUID

from sqlalchemy import Table, and_, bindparam, exists, func, insert, or_, select, update
from sqlalchemy.dialects import postgresql, sqlite

from app.accounts.models import User
from app.chat.models import ChatWindow, Conversation, UserEvent, UserStream
from app.consultations.lifecycle import ENDED
from app.consultations.models import Consultation
from app.errors import Conflict
from app.notifications.models import Reminder
from app.outbox import OutboxEvent
from app.scheduling.models import ClinicService, Slot, SpecialtyRule


def _table(model: Any) -> Table:
    table: Table = model.__table__
    return table


USERS, SLOTS, SERVICES, RULES = _table(User), _table(Slot), _table(ClinicService), _table(SpecialtyRule)
VISITS, CONVERSATIONS, WINDOWS = _table(Consultation), _table(Conversation), _table(ChatWindow)
REMINDERS, OUTBOX, STREAMS, EVENTS = _table(Reminder), _table(OutboxEvent), _table(UserStream), _table(UserEvent)
LIVE = ("pending_confirmation", "confirmed", "in_progress")
NOT_ENDED = tuple(sorted(s.value for s in ENDED))

# --- before the transaction: is the slot there and free (autocommit, no lock, no write) --------------------

SLOT_NOW = select(SLOTS.c.consultation_id, SLOTS.c.hold_id, SLOTS.c.held_by, SLOTS.c.held_until).where(
    SLOTS.c.id == bindparam("slot_id", type_=SLOTS.c.id.type))

# --- 1. the facts, under the patient's row lock ----------------------------------------------------------
# FOR NO KEY UPDATE of the patient's row: this patient's bookings and holds queue up from here (rows merely
# referring to the patient are not blocked). The slot, service, specialist and rule ride along in the same
# round trip; none of them is decided here (the claim decides the slot). SQLite has no row locks: there the
# claim, the first write, takes the one writer's lock, and what depends on the patient's other bookings is
# read after it.

_patient, _specialist = USERS.alias("patient"), USERS.alias("specialist")
_pid = bindparam("patient_id", type_=USERS.c.id.type)


def _completed(*more: Any) -> Any:
    return exists().where(VISITS.c.patient_id == _pid, VISITS.c.status == "completed", *more)


FACTS = (
    select(_patient.c.id.label("patient_id"), _patient.c.full_name, _patient.c.birth_date, _patient.c.sex,
           _patient.c.guardian_id, _patient.c.phone,
           SLOTS.c.id.label("slot_id"), SLOTS.c.specialist_id, SLOTS.c.starts_at, SLOTS.c.ends_at,
           SLOTS.c.consultation_id.label("slot_taken_by"),
           SERVICES.c.id.label("service_id"), SERVICES.c.specialty, SERVICES.c.active.label("service_active"),
           SERVICES.c.in_person_only,
           _specialist.c.roles.label("specialist_roles"), _specialist.c.specialties.label("specialist_specialties"),
           RULES.c.id.label("rule_id"), RULES.c.min_age, RULES.c.max_age, RULES.c.sex.label("rule_sex"),
           _completed().label("completed_any"),
           _completed(VISITS.c.format == "in_person").label("completed_in_person"))
    .select_from(_patient
                 .outerjoin(SLOTS, SLOTS.c.id == bindparam("slot_id", type_=SLOTS.c.id.type))
                 .outerjoin(SERVICES, SERVICES.c.id == bindparam("service_id", type_=SERVICES.c.id.type))
                 .outerjoin(_specialist, _specialist.c.id == SLOTS.c.specialist_id)
                 .outerjoin(RULES, RULES.c.specialty == SERVICES.c.specialty))
    .where(_patient.c.id == _pid)
    .with_for_update(of=_patient, key_share=True))

# --- 2. the claim: one conditional UPDATE, so exactly one racer wins ---------------------------------------

_now = bindparam("now", type_=SLOTS.c.held_until.type)
_free = and_(SLOTS.c.consultation_id.is_(None), or_(SLOTS.c.held_until.is_(None), SLOTS.c.held_until <= _now))
_claim = (update(SLOTS)
          .values(consultation_id=bindparam("claim_for", type_=SLOTS.c.consultation_id.type), hold_id=None,
                  held_by=None, held_until=None, updated_at=_now)
          .returning(SLOTS.c.id))
_slot = SLOTS.c.id == bindparam("claim_slot", type_=SLOTS.c.id.type)
CLAIM = _claim.where(_slot, SLOTS.c.starts_at > _now, _free)
# with the caller's own hold: free, or held by them under this hold
CLAIM_HELD = _claim.where(_slot, SLOTS.c.starts_at > _now, or_(_free, and_(
    SLOTS.c.consultation_id.is_(None), SLOTS.c.hold_id == bindparam("hold", type_=SLOTS.c.hold_id.type),
    SLOTS.c.held_by == bindparam("holder", type_=SLOTS.c.held_by.type))))

# --- 3. after the claim: the patient's other visits, and the pair's conversation ---------------------------

AFTER_CLAIM = select(
    select(func.count()).select_from(VISITS).where(
        VISITS.c.patient_id == _pid, VISITS.c.ends_at > _now, VISITS.c.status.not_in(NOT_ENDED))
    .scalar_subquery().label("upcoming"),
    exists().where(VISITS.c.patient_id == _pid, VISITS.c.status.in_(LIVE),
                   VISITS.c.starts_at < bindparam("ends_at", type_=VISITS.c.starts_at.type),
                   VISITS.c.ends_at > bindparam("starts_at", type_=VISITS.c.ends_at.type)).label("busy"),
    *(select(column).where(
        CONVERSATIONS.c.patient_id == _pid,
        CONVERSATIONS.c.specialist_id == bindparam("specialist_id", type_=CONVERSATIONS.c.specialist_id.type))
      .scalar_subquery().label(label)
      for column, label in ((CONVERSATIONS.c.id, "conversation_id"),
                            (CONVERSATIONS.c.patient_has_login, "patient_has_login"),  # who its people are
                            (CONVERSATIONS.c.guardian_id, "conversation_guardian_id"))))

# --- 4. the writes ------------------------------------------------------------------------------------------

FILL_CARD = (update(USERS).where(USERS.c.id == bindparam("card_of", type_=USERS.c.id.type))
             .values(birth_date=func.coalesce(USERS.c.birth_date, bindparam("told_birth_date",
                                                                            type_=USERS.c.birth_date.type)),
                     sex=func.coalesce(USERS.c.sex, bindparam("told_sex", type_=USERS.c.sex.type)),
                     updated_at=bindparam("at", type_=USERS.c.updated_at.type)))
CONVERSATION_OF_PAIR = select(CONVERSATIONS.c.id).where(
    CONVERSATIONS.c.patient_id == _pid,
    CONVERSATIONS.c.specialist_id == bindparam("specialist_id", type_=CONVERSATIONS.c.specialist_id.type))
NEW_VISIT = insert(VISITS)
NEW_OUTBOX_EVENT = insert(OUTBOX)
NEW_EVENTS = insert(EVENTS)
PARTY_WINDOW = select(
    CONVERSATIONS.c.extended_until,
    select(func.max(WINDOWS.c.ends_at)).where(WINDOWS.c.conversation_id == CONVERSATIONS.c.id)
    .scalar_subquery().label("planned_end"),
).where(CONVERSATIONS.c.id == bindparam("conversation_id", type_=CONVERSATIONS.c.id.type))


@dataclass(frozen=True, slots=True)
class Dialect:
    """The statements that take ON CONFLICT, which each dialect spells in its own construct."""

    new_conversation: Any
    new_window: Any
    new_reminders: Any
    numbering: dict[int, Any]  # stream numbering by recipient count


def _dialect(insert_of: Any) -> Dialect:
    return Dialect(
        new_conversation=insert_of(CONVERSATIONS).on_conflict_do_nothing().returning(CONVERSATIONS.c.id),
        new_window=insert_of(WINDOWS).on_conflict_do_nothing(),
        new_reminders=insert_of(REMINDERS).on_conflict_do_nothing(),
        numbering={})


DIALECTS = {"postgresql": _dialect(postgresql.insert), "sqlite": _dialect(sqlite.insert)}


def numbering(dialect: str, count: int) -> Any:
    """Move `count` users' streams forward (parameters user_0, n_0, ...), in user order, in one statement;
    each stream's last position after (app/chat/streams.py `number`, with its statement built once)."""
    known = DIALECTS[dialect].numbering
    if count not in known:
        insert_of = postgresql.insert if dialect == "postgresql" else sqlite.insert
        upsert = insert_of(STREAMS).values([
            {"user_id": bindparam(f"user_{i}", type_=STREAMS.c.user_id.type),
             "last_seq": bindparam(f"n_{i}", type_=STREAMS.c.last_seq.type)} for i in range(count)])
        known[count] = upsert.on_conflict_do_update(
            index_elements=[STREAMS.c.user_id], set_={"last_seq": STREAMS.c.last_seq + upsert.excluded.last_seq},
        ).returning(STREAMS.c.user_id, STREAMS.c.last_seq)
    return known[count]


# --- one process's bookers of one slot take turns ----------------------------------------------------------


class _Queue:
    __slots__ = ("booked", "lock", "people")

    def __init__(self) -> None:
        self.lock = asyncio.Lock()  # first come, first served
        self.people = 0  # holding the turn or queued for it
        self.booked = False


class SlotTurns:
    """The bookers of one slot in this process queue up instead of racing each other through the database:
    once one of them has booked it (committed), those queued behind are answered 409 at once, having read and
    written nothing; when it failed, the next one tries. The database still decides between processes, and
    a booker arriving when nobody is queued asks it."""

    def __init__(self) -> None:
        self._queues: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[UUID, _Queue]] = (
            weakref.WeakKeyDictionary())

    @asynccontextmanager
    async def turn(self, slot_id: UUID) -> AsyncIterator[None]:
        """The block is this booker's attempt; it booked the slot when the block ends without an error."""
        queues = self._queues.setdefault(asyncio.get_running_loop(), {})
        queue = queues.get(slot_id)
        if queue is None:
            queue = queues[slot_id] = _Queue()
        queue.people += 1
        try:
            async with queue.lock:
                if queue.booked:
                    raise Conflict("the slot is already taken", "slot_taken")
                yield
                queue.booked = True
        finally:
            queue.people -= 1
            if queue.people == 0:
                del queues[slot_id]


TURNS = SlotTurns()


def reminder_rows(consultation_id: UUID, starts_at: dt.datetime, offsets: list[int], now: dt.datetime,
                  new_id: Any) -> list[dict[str, Any]]:
    """The reminders of a booked consultation (app/notifications/reminders.py): offsets already past skipped."""
    return [{"id": new_id(), "consultation_id": consultation_id, "offset_minutes": m, "staged_at": None,
             "due_at": starts_at - dt.timedelta(minutes=m), "created_at": now, "updated_at": now}
            for m in offsets if starts_at - dt.timedelta(minutes=m) > now]
