"""Consultation lists on the hot read path (app/reads.py): a calendar or a patient's own list in one statement.

The rows come back with their patient's name, birth date and guardian, so the masked short card of each
(`patient`) is built from the same row: no second query for the cards, none for the caller's dependents (the
patient side is a subquery of the caller and the accounts they manage).
"""

from __future__ import annotations

import datetime as dt
import functools
from typing import Any
from uuid import UUID

from sqlalchemy import Executable, Integer, and_, bindparam, or_, select

from app import access
from app.access import Viewer
from app.accounts.models import User
from app.accounts.service import age_on, initials
from app.consultations.models import Consultation
from app.consultations.schemas import ConsultationOut, PatientBrief
from app.reads import Reads, Row
from app.schemas import Page

# who the caller is to the calendar: whose consultations it lists
FRONT_DESK, CLINICIAN, PATIENT_SIDE = "front_desk", "clinician", "patient_side"

_COLUMNS = (Consultation.id, Consultation.patient_id, Consultation.specialist_id, Consultation.service_id,
            Consultation.slot_id, Consultation.specialty, Consultation.starts_at, Consultation.ends_at,
            Consultation.format, Consultation.status, Consultation.paid, Consultation.conversation_id)
_PATIENT = (User.full_name.label("patient_full_name"), User.birth_date.label("patient_birth_date"),
            User.guardian_id.label("patient_guardian_id"))


@functools.cache
def calendar_statement(side: str, by_specialist: bool, since: bool, until: bool, by_status: bool,
                       after: bool) -> Executable:
    """The calendar for one shape of question (built once per shape: each filter is there or not, so every
    statement keeps the plain index conditions a planner can use)."""
    query = select(*_COLUMNS, *_PATIENT).join(User, User.id == Consultation.patient_id)
    if side == CLINICIAN:
        query = query.where(Consultation.specialist_id == bindparam("uid"))
    elif side == PATIENT_SIDE:  # the caller and their dependents (AccountService.patients_acted_for)
        acted_for = select(User.id).where(or_(User.id == bindparam("uid"), User.guardian_id == bindparam("uid")))
        query = query.where(Consultation.patient_id.in_(acted_for.scalar_subquery()))
    if by_specialist:
        query = query.where(Consultation.specialist_id == bindparam("specialist_id"))
    if since:
        query = query.where(Consultation.starts_at >= bindparam("start"))
    if until:
        query = query.where(Consultation.starts_at < bindparam("end"))
    if by_status:
        query = query.where(Consultation.status == bindparam("status"))
    if after:
        query = query.where(or_(Consultation.starts_at > bindparam("after_at"),
                                and_(Consultation.starts_at == bindparam("after_at"),
                                     Consultation.id > bindparam("after_id"))))
    return query.order_by(Consultation.starts_at, Consultation.id).limit(bindparam("rows", type_=Integer))


def side_of(viewer: Viewer) -> str:
    if viewer.has_any(access.BOOKERS_FOR_OTHERS):
        return FRONT_DESK  # every calendar, or one specialist's
    if access.is_clinician(viewer):
        return CLINICIAN  # their own
    return PATIENT_SIDE


class Briefs:
    """The patients' short cards of one answer through the secrecy masks (app/access.py), one per patient."""

    __slots__ = ("_cards", "_today", "_viewer", "_visible")

    def __init__(self, viewer: Viewer) -> None:
        self._viewer = viewer
        self._today = dt.date.today()
        self._cards: dict[UUID, PatientBrief] = {}
        # what the viewer sees of a patient depends on the patient only by whether it is the viewer, a ward of
        # theirs, or someone else (access.visible_card_fields): asked once for each of these
        self._visible: dict[int, frozenset[str]] = {}

    def of(self, row: Row) -> PatientBrief:
        patient_id: UUID = row["patient_id"]
        card = self._cards.get(patient_id)
        if card is None:
            viewer, guardian_id = self._viewer, row["patient_guardian_id"]
            relation = 0 if patient_id == viewer.id else 1 if guardian_id == viewer.id else 2
            visible = self._visible.get(relation)
            if visible is None:
                visible = self._visible[relation] = access.visible_card_fields(
                    viewer, patient_id, [patient_id] if relation == 1 else [])
            name, born = row["patient_full_name"], row["patient_birth_date"]
            masked = access.mask_patient({  # what the mask hides is not even worked out
                "id": patient_id, "full_name": name,
                "initials": initials(name) if "initials" in visible else None,
                "age": age_on(born, self._today) if born and "age" in visible else None,
                "is_dependent": guardian_id is not None}, visible)
            card = self._cards[patient_id] = PatientBrief(
                id=masked["id"], full_name=masked["full_name"], initials=masked["initials"], age=masked["age"],
                is_dependent=masked["is_dependent"])
        return card


async def calendar(reads: Reads, viewer: Viewer, start: dt.datetime | None, end: dt.datetime | None,
                   status: str | None, specialist_id: UUID | None, limit: int,
                   cursor: tuple[dt.datetime, UUID] | None) -> Page[ConsultationOut]:
    """The caller's consultations by start time: the front desk every calendar (or one specialist's), a
    clinician their own, anyone else theirs and their dependents'; keyset pages of `limit`."""
    side = side_of(viewer)
    by_specialist = side == FRONT_DESK and specialist_id is not None
    statement = calendar_statement(side, by_specialist, start is not None, end is not None, status is not None,
                                   cursor is not None)
    params: dict[str, Any] = {"rows": limit + 1}
    if side != FRONT_DESK:
        params["uid"] = viewer.id
    if by_specialist:
        params["specialist_id"] = specialist_id
    if start is not None:
        params["start"] = start
    if end is not None:
        params["end"] = end
    if status is not None:
        params["status"] = str(status)
    if cursor is not None:
        params["after_at"], params["after_id"] = cursor
    rows = await reads.all(statement, **params)
    more = len(rows) > limit
    rows = rows[:limit]
    briefs = Briefs(viewer)
    items = [ConsultationOut(id=r["id"], patient_id=r["patient_id"], specialist_id=r["specialist_id"],
                             service_id=r["service_id"], slot_id=r["slot_id"], specialty=r["specialty"],
                             starts_at=r["starts_at"], ends_at=r["ends_at"], format=r["format"], status=r["status"],
                             paid=r["paid"], conversation_id=r["conversation_id"], patient=briefs.of(r))
             for r in rows]
    last = rows[-1] if more else None
    return Page(items=items, next_cursor=f"{last['starts_at'].isoformat()}|{last['id']}" if last else None)
