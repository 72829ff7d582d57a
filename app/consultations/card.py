"""A patient's card by id (GET /api/v1/patients/{id}), read in one statement on the hot read path (app/reads.py).

The account and every reason the caller may read it come back together: in the caller's care (app/consultations
care rules), an analysis of the patient in the methodists' inbox, or one forwarded to the caller
(app/documents/grants.py). Which reasons count depends on the caller's roles, decided here as the service did.
"""

from __future__ import annotations

import datetime as dt
from typing import Any
from uuid import UUID

from sqlalchemy import bindparam, select

from app import access
from app.access import Role, Viewer
from app.accounts.models import User
from app.accounts.schemas import PatientCardOut
from app.accounts.service import CARD_COLUMNS, card_from
from app.audit.service import AuditTrail
from app.consultations.models import Consultation
from app.consultations.service import caring_since
from app.documents.grants import SHARED_WITH, in_inbox, shared_with
from app.errors import NotVisible
from app.reads import Reads

_viewer: Any = bindparam("viewer_id")
_patient: Any = bindparam("patient_id")

CARD = select(
    *(getattr(User, name) for name in CARD_COLUMNS), User.is_staff,
    select(Consultation.id).where(Consultation.specialist_id == _viewer, Consultation.patient_id == User.id,
                                  caring_since(bindparam("care_since"))).exists().label("in_care"),
    in_inbox(User.id).label("in_inbox"),
    shared_with(_viewer, User.id).label("shared"),
).where(User.id == _patient)


def _may_read(viewer: Viewer, row: Any) -> bool:
    if row["id"] == viewer.id or row["guardian_id"] == viewer.id or access.may_read_any_card(viewer):
        return True
    # methodists read no card by id: the inbox grants those of patients behind an analysis in it, and a
    # forwarded analysis its patient's to the specialist it went to
    return bool((access.is_clinician(viewer) and row["in_care"])
                or (Role.METHODIST in viewer.roles and row["in_inbox"])
                or (viewer.roles & SHARED_WITH and row["shared"]))


async def patient_card(reads: Reads, viewer: Viewer, patient_id: UUID, care_after_days: int,
                       audit: AuditTrail | None) -> PatientCardOut:
    """The card, masked for the caller: their own or a dependent's, the front desk's, or a clinician's in care
    of the patient; anyone else gets 404. A staff read is audited (whatever the mask lets through: that a
    person is the clinic's patient is a secret too)."""
    since = dt.datetime.now(dt.UTC) - dt.timedelta(days=care_after_days)
    row = await reads.one(CARD, viewer_id=viewer.id, patient_id=patient_id, care_since=since)
    # a patient's account: not staff, not a bare account (no phone and no guardian)
    if row is None or row["is_staff"] or (row["phone"] is None and row["guardian_id"] is None) \
            or not _may_read(viewer, row):
        raise NotVisible("patient not found")
    own = row["id"] == viewer.id or row["guardian_id"] == viewer.id
    if audit is not None:
        audit.read("card.read", "patient", row["id"], row["id"], own=own)
    acts_for = [row["id"]] if row["guardian_id"] == viewer.id else []
    visible = access.visible_card_fields(viewer, row["id"], acts_for)
    return PatientCardOut(**access.mask_patient(card_from(row), visible))
