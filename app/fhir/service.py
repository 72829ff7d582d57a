"""FHIR reads and searches, each answered by the REST read that answers the same question, so the access rules,
masks and audit rows are those of the REST API:

- Patient: the card read (app/consultations/card.py: who may read it, the card mask, the `card.read` audit row);
- Practitioner, PractitionerRole, Schedule, Slot: the public catalogue's specialists and free slots
  (AccountService.specialist(s), app/scheduling/reads.py `free_slots`);
- Appointment, Encounter: a consultation by id as `ConsultationService.visible` allows it, a search as the
  calendar does (app/fhir/queries.py), patients' names through the brief-card mask;
- DocumentReference, and DiagnosticReport for the analyses among them: `DocumentService.read` (the documents
  mask, the `document.read` audit row), a search as the documents list (its mask and its `documents.list`
  audit rows);
- Communication: a chat's history as app/chat/reads.py `history` allows it (the conversation's people only;
  the specialist's read audited as `chat.read`).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence
from typing import Any
from uuid import UUID

from litestar import Request
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from app.access import Viewer
from app.audit.service import audit_trail
from app.chat import reads as chat_reads
from app.chat.models import Message
from app.consultations import card as card_reads
from app.consultations.reads import Briefs
from app.errors import NotVisible
from app.fhir import queries, resources
from app.fhir.search import (
    BadSearch,
    DateBound,
    Search,
    date_bounds,
    encode_cursor,
    only_id,
    page_url,
    reference_id,
    time_and_id,
)
from app.scheduling import reads as slot_reads
from app.scheduling.models import Schedule
from app.services import accounts_for, consultations_for, documents_for
from app.timeparams import MAX_RANGE, zone

VISIT_COLUMNS = ("id", "patient_id", "specialist_id", "slot_id", "specialty", "starts_at", "ends_at", "format",
                 "status", "started_at", "completed_at")
DOCUMENT_COLUMNS = ("id", "patient_id", "kind", "filename", "content_type", "size", "status", "author_id",
                    "author_role", "created_at")
# FHIR status codes -> the consultation and document statuses they stand for
APPOINTMENT_STATUSES = {fhir: (ours,) for ours, fhir in resources.APPOINTMENT_STATUS.items()}
ENCOUNTER_STATUSES = {fhir: (ours,) for ours, fhir in resources.ENCOUNTER_STATUS.items()}
DOCUMENT_STATUSES = {"current": ("ready", "pending"), "entered-in-error": ("rejected",)}
REPORT_STATUSES = {"final": ("ready",), "registered": ("pending",), "entered-in-error": ("rejected",)}
SLOT_DAYS = 31  # a slot search without an end looks this far ahead


def _id(ident: str, resource_type: str) -> UUID:
    try:
        return UUID(ident)
    except ValueError:
        raise NotVisible(f"{resource_type} not found") from None  # no resource has an id of that form


def _zone(request: Request[Any, Any, Any]) -> dt.tzinfo:
    return zone(request.app.state.settings.clinic_timezone)


# --- reads by id ----------------------------------------------------------------------------------

async def read(request: Request[Viewer, Any, Any], session: AsyncSession, resource_type: str, ident: str,
               app_base: str, fhir_base: str) -> dict[str, Any]:
    state, viewer = request.app.state, request.user
    if resource_type == "Patient":
        card = await card_reads.patient_card(state.database.reads, viewer, _id(ident, "Patient"),
                                             state.settings.care_after_days, audit_trail(request))
        return resources.patient(card)
    if resource_type in ("Practitioner", "PractitionerRole"):
        specialist = await accounts_for(session, state).specialist(_id(ident, resource_type))
        return (resources.practitioner(specialist) if resource_type == "Practitioner"
                else resources.practitioner_role(specialist))
    if resource_type == "Schedule":
        schedule = await session.get(Schedule, _id(ident, "Schedule"))
        if schedule is None:
            raise NotVisible("Schedule not found")
        specialist = await accounts_for(session, state).specialist(schedule.specialist_id)
        return resources.schedule(schedule, specialist)
    if resource_type in ("Appointment", "Encounter"):
        consultations = consultations_for(session, state)
        visit, _ = await consultations.visible(viewer, _id(ident, resource_type))
        if resource_type == "Encounter" and visit.status not in resources.ENCOUNTER_STATUS:
            raise NotVisible("Encounter not found")  # a visit that never began has no encounter
        brief = (await consultations.accounts.briefs(viewer, [visit.patient_id])).get(visit.patient_id)
        name = (brief["full_name"] or brief["initials"]) if brief else None
        columns = resources.model_columns(visit, VISIT_COLUMNS)
        return (resources.appointment(columns, name) if resource_type == "Appointment"
                else resources.encounter(columns, name))
    if resource_type in ("DocumentReference", "DiagnosticReport"):
        document = await documents_for(session, state).read(viewer, _id(ident, resource_type),
                                                            audit=audit_trail(request))
        columns = resources.model_columns(document, DOCUMENT_COLUMNS)
        if resource_type == "DocumentReference":
            return resources.document_reference(columns, app_base)
        if document.kind != "analysis":  # only an analysis is a report
            raise NotVisible("DiagnosticReport not found")
        return resources.diagnostic_report(columns, app_base)
    raise NotVisible(f"this server does not read {resource_type} resources by id", reason="read_unsupported")


# --- searches -------------------------------------------------------------------------------------

async def search(request: Request[Viewer, Any, Any], session: AsyncSession, resource_type: str, wanted: Search,
                 app_base: str, fhir_base: str) -> dict[str, Any]:
    """A searchset Bundle: one page of what the caller may see, `total` of all of it, and the next page's link
    (keyset: the cursor is where this page ended, opaque to the client)."""
    self_url = page_url(f"{fhir_base}/{resource_type}", wanted, wanted.cursor)
    if resource_type in ("Appointment", "Encounter"):
        entries, total, last = await _visits(request, resource_type, wanted)
    elif resource_type in ("DocumentReference", "DiagnosticReport"):
        entries, total, last = await _documents(request, wanted, app_base, resource_type)
    elif resource_type in ("Practitioner", "PractitionerRole"):
        entries, total, last = await _practitioners(request, session, resource_type, wanted)
    elif resource_type == "Schedule":
        entries, total, last = await _schedules(request, session, wanted)
    elif resource_type == "Slot":
        entries, total, last = await _slots(request, session, wanted)
    else:  # Communication (the capability table admits no other)
        entries, total, last = await _communications(request, session, wanted, app_base)
    next_url = page_url(f"{fhir_base}/{resource_type}", wanted, last) if last is not None else None
    return resources.searchset(entries, total, self_url, next_url, fhir_base)


Page = tuple[list[dict[str, Any]], int | None, str | None]  # entries, total (None: not counted), next cursor


def _patient(wanted: Search) -> UUID | None:
    value = wanted.one("patient")
    return reference_id(value, "Patient") if value is not None else None


def _statuses(wanted: Search, known: Mapping[str, tuple[str, ...]]) -> tuple[str, ...] | None:
    values = wanted.params.get("status")
    if not values:
        return None
    codes = [code for value in values for code in value.split(",")]  # a comma is FHIR's "or"
    unknown = sorted(set(codes) - set(known))
    if unknown:
        raise BadSearch(f"unknown status: {', '.join(unknown)} (known: {', '.join(known)})", "status_invalid")
    return tuple(sorted({ours for code in codes for ours in known[code]}))


async def _visits(request: Request[Viewer, Any, Any], resource_type: str, wanted: Search) -> Page:
    viewer = request.user
    encounters = resource_type == "Encounter"
    statuses = _statuses(wanted, ENCOUNTER_STATUSES if encounters else APPOINTMENT_STATUSES)
    if encounters and statuses is None:
        statuses = tuple(sorted(resources.ENCOUNTER_STATUS))
    found = await queries.consultations(request.app.state.database.reads, viewer, _patient(wanted),
                                        date_bounds(wanted.params.get("date", []), _zone(request)), statuses,
                                        wanted.count, time_and_id(wanted.cursor))
    briefs = Briefs(viewer)
    build = resources.encounter if encounters else resources.appointment
    entries = [build(row, resources.patient_display(briefs.of(row))) for row in found.rows]
    last = found.rows[-1] if found.more else None
    return entries, found.total, encode_cursor(last["starts_at"], last["id"]) if last is not None else None


async def _documents(request: Request[Viewer, Any, Any], wanted: Search, app_base: str, resource_type: str) -> Page:
    state = request.app.state
    reports = resource_type == "DiagnosticReport"
    found = await queries.documents(state.database.reads, request.user, _patient(wanted),
                                    date_bounds(wanted.params.get("date", []), _zone(request)),
                                    _statuses(wanted, REPORT_STATUSES if reports else DOCUMENT_STATUSES),
                                    wanted.count, only_id(wanted.cursor), state.settings.care_after_days,
                                    audit_trail(request), kind="analysis" if reports else None)
    build = resources.diagnostic_report if reports else resources.document_reference
    entries = [build(row, app_base) for row in found.rows]
    last = found.rows[-1] if found.more else None
    return entries, found.total, encode_cursor(last["id"]) if last is not None else None


def _keyset_by_id(items: Sequence[Any], wanted: Search) -> tuple[list[Any], str | None]:
    """A page of a short list (a clinic's specialists), in id order after the cursor."""
    after = only_id(wanted.cursor)
    ordered = sorted((i for i in items if after is None or i.id > after), key=lambda i: i.id)
    shown = ordered[:wanted.count]
    return shown, encode_cursor(shown[-1].id) if len(ordered) > wanted.count else None


async def _practitioners(request: Request[Viewer, Any, Any], session: AsyncSession, resource_type: str,
                         wanted: Search) -> Page:
    specialty = wanted.one("specialty")
    if specialty is not None:
        specialty = specialty.removeprefix(f"{resources.SPECIALTY_SYSTEM}|")
    specialists = await accounts_for(session, request.app.state).specialists(specialty)
    practitioner = wanted.one("practitioner")
    if practitioner is not None:
        chosen = reference_id(practitioner, "Practitioner")
        specialists = [s for s in specialists if s.id == chosen]
    shown, last = _keyset_by_id(specialists, wanted)
    build = resources.practitioner if resource_type == "Practitioner" else resources.practitioner_role
    return [build(s) for s in shown], len(specialists), last


async def _schedules(request: Request[Viewer, Any, Any], session: AsyncSession, wanted: Search) -> Page:
    specialists = {s.id: s for s in await accounts_for(session, request.app.state).specialists()}
    actor = wanted.one("actor")
    if actor is not None:
        chosen = reference_id(actor, "Practitioner")
        specialists = {i: s for i, s in specialists.items() if i == chosen}
    schedules = (await session.scalars(select(Schedule).where(Schedule.specialist_id.in_(list(specialists))))
                 ).all() if specialists else []
    shown, last = _keyset_by_id(schedules, wanted)
    return [resources.schedule(s, specialists[s.specialist_id]) for s in shown], len(schedules), last


def _window(bounds: Sequence[DateBound]) -> tuple[dt.datetime, dt.datetime]:
    now = dt.datetime.now(dt.UTC)
    starts = [b.at for b in bounds if b.op == ">="]
    ends = [b.at for b in bounds if b.op == "<"]
    start = max(starts) if starts else now
    return start, min(ends) if ends else start + dt.timedelta(days=SLOT_DAYS)


SLOT_STATUSES = frozenset({"busy", "free", "busy-unavailable", "busy-tentative", "entered-in-error"})  # FHIR's


async def _slots(request: Request[Viewer, Any, Any], session: AsyncSession, wanted: Search) -> Page:
    value = wanted.one("schedule")
    if value is None:
        raise BadSearch("a Slot search names its schedule (schedule=Schedule/{id})", "schedule_required")
    schedule = await session.get(Schedule, reference_id(value, "Schedule"))
    if schedule is None:
        return [], 0, None
    statuses = [code for v in wanted.params.get("status", []) for code in v.split(",")]
    if unknown := sorted(set(statuses) - SLOT_STATUSES):
        raise BadSearch(f"unknown status: {', '.join(unknown)} (known: {', '.join(sorted(SLOT_STATUSES))})",
                        "status_invalid")
    if statuses and "free" not in statuses:
        return [], 0, None  # only free slots are published (as in REST)
    start, end = _window(date_bounds(wanted.params.get("start", []), _zone(request)))
    if end - start > MAX_RANGE:  # as the REST slot search: a bounded read
        raise BadSearch(f"a Slot search spans at most {MAX_RANGE.days} days", "range_too_long")
    try:
        free = await slot_reads.free_slots(request.app.state.database.reads, schedule.specialist_id, start, end)
    except NotVisible:  # the schedule's owner is no longer a specialist
        return [], 0, None
    after = time_and_id(wanted.cursor)
    rest = [s for s in free if after is None or (s.starts_at, s.id) > after]
    shown = rest[:wanted.count]
    entries = [resources.free_slot(s, schedule.id) for s in shown]
    last = shown[-1] if len(rest) > wanted.count else None
    return entries, len(free), encode_cursor(last.starts_at, last.id) if last is not None else None


async def _communications(request: Request[Viewer, Any, Any], session: AsyncSession, wanted: Search,
                          app_base: str) -> Page:
    """A visit's chat, newest first: the consultation as the caller may see it, then its conversation's history
    as the chat lets them read it (which audits the specialist's read)."""
    value = wanted.one("encounter")
    if value is None:
        raise BadSearch("a Communication search names its encounter (encounter=Encounter/{id})",
                        "encounter_required")
    viewer, state = request.user, request.app.state
    try:
        visit, _ = await consultations_for(session, state).visible(viewer, reference_id(value, "Encounter"))
    except NotVisible:
        return [], 0, None  # a search finds nothing where a read would answer 404
    if visit.status not in resources.ENCOUNTER_STATUS or visit.conversation_id is None:
        return [], 0, None
    conversation_id = visit.conversation_id
    try:
        messages = await chat_reads.history(state.database.reads, viewer, conversation_id, only_id(wanted.cursor),
                                            None, wanted.count + 1, audit_trail(request))
    except NotVisible:  # not one of the conversation's people (the front desk reads no chats)
        return [], 0, None
    newest_first = messages[::-1]
    shown = newest_first[:wanted.count]
    total = None if wanted.cursor else int(await session.scalar(select(func.count()).select_from(Message).where(
        Message.conversation_id == conversation_id)) or 0)
    # one conversation holds every visit of this patient with this specialist: the messages are the pair's, so
    # none is stamped with the encounter asked for
    entries = [resources.communication(m, patient_id=visit.patient_id, specialist_id=visit.specialist_id,
                                       base_url=app_base) for m in shown]
    last = shown[-1] if len(newest_first) > wanted.count else None
    return entries, total, encode_cursor(last.id) if last is not None else None
