"""The documents list (GET /api/v1/documents) on the hot read path (app/reads.py): one statement per request.

The mask is the documents service's `visible_clause`, built once per set of roles with the caller's id and the
moment care lapses as parameters; each row says whether its patient is the caller's own (themself or a
dependent), which is what the audit needs.
"""

from __future__ import annotations

import datetime as dt
import functools
from typing import Any
from uuid import UUID

from sqlalchemy import bindparam, or_, select

from app.access import Role, Viewer
from app.accounts.models import User
from app.audit.service import AuditTrail
from app.documents.models import Document
from app.documents.schemas import DocumentOut
from app.documents.service import visible_clause
from app.reads import Reads
from app.schemas import Page

_viewer: Any = bindparam("viewer_id")
COLUMNS = (Document.id, Document.patient_id, Document.kind, Document.filename, Document.content_type,
           Document.size, Document.status, Document.author_id, Document.author_role, Document.consultation_id,
           Document.conversation_id, Document.created_at, Document.inbox_status)
WARDS = select(User.id).where(User.guardian_id == _viewer)
OWN_PATIENT = select(User.id).where(User.id == bindparam("patient_id"),
                                    or_(User.id == _viewer, User.guardian_id == _viewer))


@functools.lru_cache(maxsize=512)
def listing(roles: frozenset[Role], by_patient: bool, by_kind: bool, after: bool) -> Any:
    """The page's statement for callers with these roles and these filters (newest first, by id)."""
    own = Document.patient_id == _viewer
    if Role.PATIENT in roles:
        own = or_(own, Document.patient_id.in_(WARDS))
    query = select(*COLUMNS, own.label("own")).where(visible_clause(roles, _viewer, bindparam("care_since")))
    if by_patient:
        query = query.where(Document.patient_id == bindparam("patient_id"))
    if by_kind:
        query = query.where(Document.kind == bindparam("kind"))
    if after:
        query = query.where(Document.id < bindparam("cursor"))
    return query.order_by(Document.id.desc()).limit(bindparam("rows"))


async def documents(reads: Reads, viewer: Viewer, patient_id: UUID | None, kind: str | None, limit: int,
                    cursor: UUID | None, care_after_days: int, audit: AuditTrail | None) -> Page[DocumentOut]:
    """What the caller may see, newest first. A staff member listing patients' documents leaves one audit row per
    patient the page showed (or they asked for)."""
    statement = listing(viewer.roles, patient_id is not None, kind is not None, cursor is not None)
    since = dt.datetime.now(dt.UTC) - dt.timedelta(days=care_after_days)
    rows = await reads.all(statement, viewer_id=viewer.id, care_since=since, patient_id=patient_id, kind=kind,
                           cursor=cursor, rows=limit + 1)
    shown = rows[:limit]
    if audit is not None:
        others = {r["patient_id"] for r in shown if not r["own"]}
        if patient_id is not None and patient_id not in {r["patient_id"] for r in shown} \
                and await reads.one(OWN_PATIENT, viewer_id=viewer.id, patient_id=patient_id) is None:
            others.add(patient_id)  # asked for, even if nothing showed
        for patient in sorted(others):
            audit.read("documents.list", "patient", patient, patient)
    items = [DocumentOut(id=r["id"], patient_id=r["patient_id"], kind=r["kind"], filename=r["filename"],
                         content_type=r["content_type"], size=r["size"], status=r["status"],
                         author_id=r["author_id"], author_role=r["author_role"],
                         consultation_id=r["consultation_id"], conversation_id=r["conversation_id"],
                         created_at=r["created_at"], inbox_status=r["inbox_status"]) for r in shown]
    return Page(items=items, next_cursor=str(shown[-1]["id"]) if len(rows) > limit else None)
