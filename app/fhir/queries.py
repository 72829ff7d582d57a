"""The FHIR searches' statements, built on the REST reads' own so the access rules are the same ones.

Appointments and encounters are the consultation calendar (app/consultations/reads.py `calendar_statement`:
whose consultations the caller sees, by `side_of`) narrowed by patient, dates and statuses; documents are the
documents list (app/documents/reads.py `listing`, whose WHERE is the documents mask `visible_clause`) narrowed
by patient, dates and status. Each statement is built once per shape and kept (app/reads.py compiles it once).
A page asks for one row more than it shows, to know whether a next page exists; the first page's `total` counts
the same filter (later pages leave it out, as FHIR allows: counting a whole calendar for every page would cost
more than the page).
"""

from __future__ import annotations

import datetime as dt
import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast
from uuid import UUID

from sqlalchemy import Select, bindparam, func, select

from app.access import Role, Viewer
from app.audit.service import AuditTrail
from app.consultations import reads as calendar_reads
from app.consultations.models import Consultation
from app.documents import reads as document_reads
from app.documents.models import Document
from app.fhir.search import DateBound
from app.reads import Reads, Row

Ops = tuple[str, ...]  # the comparison of each date bound, in order (">=" or "<")


@dataclass(frozen=True, slots=True)
class Found:
    rows: Sequence[Row]  # this page's rows
    total: int | None  # on the first page only
    more: bool  # a next page exists


def _dated(query: Select[Any], column: Any, ops: Ops) -> Select[Any]:
    for n, op in enumerate(ops):
        at: Any = bindparam(f"date{n}")
        query = query.where(column >= at if op == ">=" else column < at)
    return query


def _count(query: Select[Any]) -> Select[Any]:
    return select(func.count()).select_from(query.limit(None).order_by(None).subquery())


# --- consultations: Appointment and Encounter ------------------------------------------------------

@functools.lru_cache(maxsize=512)  # the shapes are few (search.date_bounds); bounded anyway
def consultations_statement(side: str, by_patient: bool, ops: Ops, statuses: tuple[str, ...] | None,
                            after: bool, count: bool) -> Select[Any]:
    """The caller's calendar (the access rule is the calendar's) narrowed for a FHIR search."""
    base = cast(Select[Any], calendar_reads.calendar_statement(side, False, False, False, False, after and not count))
    query = base.add_columns(Consultation.started_at, Consultation.completed_at, Consultation.cancel_reason)
    if by_patient:
        query = query.where(Consultation.patient_id == bindparam("patient_id"))
    if statuses is not None:
        query = query.where(Consultation.status.in_(statuses))
    query = _dated(query, Consultation.starts_at, ops)
    return _count(query) if count else query


async def consultations(reads: Reads, viewer: Viewer, patient_id: UUID | None, bounds: Sequence[DateBound],
                        statuses: tuple[str, ...] | None, count: int,
                        cursor: tuple[dt.datetime, UUID] | None) -> Found:
    side = calendar_reads.side_of(viewer)
    ops = tuple(b.op for b in bounds)
    params: dict[str, Any] = {f"date{n}": b.at for n, b in enumerate(bounds)}
    if side != calendar_reads.FRONT_DESK:
        params["uid"] = viewer.id
    if patient_id is not None:
        params["patient_id"] = patient_id
    shape = (side, patient_id is not None, ops, statuses)
    total = None if cursor is not None else _first(await reads.one(consultations_statement(*shape, False, True),
                                                                   **params))
    if cursor is not None:
        params["after_at"], params["after_id"] = cursor
    rows = await reads.all(consultations_statement(*shape, cursor is not None, False), rows=count + 1, **params)
    return Found(rows=rows[:count], total=total, more=len(rows) > count)


def _first(row: Row | None) -> int:
    if row is None:
        return 0
    return int(next(iter(row.values())))


# --- documents: DocumentReference -----------------------------------------------------------------

@functools.lru_cache(maxsize=512)
def documents_statement(roles: frozenset[Role], by_patient: bool, ops: Ops, statuses: tuple[str, ...] | None,
                        after: bool, count: bool, kind: str | None = None) -> Select[Any]:
    """The documents list (its WHERE is the documents mask) narrowed for a FHIR search (to one kind: analyses
    are also DiagnosticReports)."""
    query = cast(Select[Any], document_reads.listing(roles, by_patient, False, after and not count))
    if statuses is not None:
        query = query.where(Document.status.in_(statuses))
    if kind is not None:
        query = query.where(Document.kind == kind)
    query = _dated(query, Document.created_at, ops)
    return _count(query) if count else query


async def documents(reads: Reads, viewer: Viewer, patient_id: UUID | None, bounds: Sequence[DateBound],
                    statuses: tuple[str, ...] | None, count: int, cursor: UUID | None, care_after_days: int,
                    audit: AuditTrail | None, kind: str | None = None) -> Found:
    """What the caller may see, newest first; audited as the REST list is (app/documents/reads.py): one row per
    patient of someone else's whose documents the page showed, or who was asked for."""
    since = dt.datetime.now(dt.UTC) - dt.timedelta(days=care_after_days)
    ops = tuple(b.op for b in bounds)
    params: dict[str, Any] = {f"date{n}": b.at for n, b in enumerate(bounds)}
    params.update(viewer_id=viewer.id, care_since=since, patient_id=patient_id)
    shape = (viewer.roles, patient_id is not None, ops, statuses)
    total = None if cursor is not None else _first(await reads.one(documents_statement(*shape, False, True, kind),
                                                                   **params))
    rows = await reads.all(documents_statement(*shape, cursor is not None, False, kind), cursor=cursor,
                           rows=count + 1, **params)
    shown = rows[:count]
    if audit is not None:
        others = {r["patient_id"] for r in shown if not r["own"]}
        if patient_id is not None and patient_id not in {r["patient_id"] for r in shown} \
                and await reads.one(document_reads.OWN_PATIENT, viewer_id=viewer.id, patient_id=patient_id) is None:
            others.add(patient_id)  # asked for, even if nothing showed
        for patient in sorted(others):
            audit.read("documents.list", "patient", patient, patient)
    return Found(rows=shown, total=total, more=len(rows) > count)
