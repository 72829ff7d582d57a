"""Who may see and upload documents, what happens when one becomes ready, lists and the methodists' inbox.

Uploads and downloads ask it through `DocumentService(session, settings, accounts)` (built by
app/services.py `documents_for`), `visible`, `may_upload`, `became_ready`.

Every way a document leaves the system asks the one mask in app/access.py (DOCUMENT_GRANTS): a single document
through `document_visible` with its relationship to the viewer worked out here, a list or the inbox through the
same grants made into one SQL clause. No HTTP here.
"""

from __future__ import annotations

import copy
import datetime as dt
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any
from uuid import UUID

import msgspec
from sqlalchemy import ColumnElement, and_, false, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from app import access, outbox
from app.access import Ground, Role, Viewer
from app.accounts.models import User
from app.accounts.service import AccountService, utcnow
from app.audit.service import AuditTrail
from app.chat import streams
from app.consultations.models import Consultation
from app.consultations.service import caring, caring_since
from app.documents.models import Document, DocumentShare
from app.documents.schemas import document_out
from app.errors import Conflict, Forbidden, Invalid, NotVisible
from app.settings import Settings
from app.timeparams import answers_in

READY = "ready"
INBOX_STATUSES = ("new", "forwarded", "processed")
ROLE_NAMES = frozenset(r.value for r in Role)
CLINICIAN_ORDER = (Role.DOCTOR, Role.PSYCHOLOGIST, Role.SONOGRAPHER, Role.MASSAGE_THERAPIST)


@dataclass(frozen=True, slots=True)
class Page:
    items: list[Document]
    next_cursor: str | None


def _page(rows: Sequence[Document], limit: int) -> Page:
    items = list(rows[:limit])
    return Page(items, str(items[-1].id) if len(rows) > limit else None)


def visible_clause(roles: frozenset[Role], viewer_id: Any, care_since: Any) -> ColumnElement[bool]:
    """The same mask as `access.document_visible`, as one SQL condition: each grant's ground, author roles and
    kinds; a document not yet ready is its author's alone. The viewer's id and the moment care lapses before
    are values or bind parameters (a statement built once per set of roles, app/documents/reads.py)."""
    clauses = []
    for grant in access.grants_of(roles):
        parts = [_ground_clause(grant.ground, roles, viewer_id, care_since)]
        if grant.authors is not None:
            parts.append(Document.author_role.in_(sorted(grant.authors)))
        if grant.kinds is not None:
            parts.append(Document.kind.in_(sorted(grant.kinds)))
        clauses.append(and_(*parts))
    return or_(and_(Document.status == READY, or_(false(), *clauses)),
               and_(Document.status != READY, Document.author_id == viewer_id))


def _ground_clause(ground: Ground, roles: frozenset[Role], viewer_id: Any, care_since: Any) -> Any:
    if ground is Ground.OWN:  # the viewer, and a patient's dependents (AccountService.patients_acted_for)
        if Role.PATIENT not in roles:
            return Document.patient_id == viewer_id
        return or_(Document.patient_id == viewer_id,
                   Document.patient_id.in_(select(User.id).where(User.guardian_id == viewer_id)))
    if ground is Ground.AUTHOR:
        return Document.author_id == viewer_id
    if ground is Ground.IN_CARE:
        return Document.patient_id.in_(select(Consultation.patient_id).where(
            Consultation.specialist_id == viewer_id, caring_since(care_since)))
    if ground is Ground.CONSULTATION:
        return Document.consultation_id.in_(select(Consultation.id).where(Consultation.specialist_id == viewer_id))
    if ground is Ground.SHARED:
        return Document.id.in_(select(DocumentShare.document_id).where(DocumentShare.specialist_id == viewer_id))
    return Document.inbox_status.is_not(None)  # Ground.INBOX


class DocumentService:
    def __init__(self, session: AsyncSession, settings: Settings, accounts: AccountService) -> None:
        self.session = session
        self.settings = settings
        self.accounts = accounts
        self._acting: dict[UUID, list[UUID]] = {}  # per viewer, for this request

    def on(self, session: AsyncSession) -> DocumentService:
        """The same service going through another session (a direct upload checks its declaration through the
        autocommit reader: one round trip, and the request's own session holds no connection while the file
        streams)."""
        accounts = copy.copy(self.accounts)
        accounts.session = session
        return DocumentService(session, self.settings, accounts)

    # --- the relationship of a viewer to documents ------------------------------------------------

    async def _acts_for(self, viewer: Viewer) -> list[UUID]:
        """Whose documents the viewer holds as their own: themself, and their dependents when a patient."""
        if Role.PATIENT not in viewer.roles:
            return [viewer.id]
        if viewer.id not in self._acting:
            self._acting[viewer.id] = await self.accounts.patients_acted_for(viewer)
        return self._acting[viewer.id]

    async def relationships(self, viewer: Viewer, documents: Sequence[Document]) -> dict[UUID, frozenset[Ground]]:
        """How the viewer stands to each document, in at most four queries whatever their number (and none for
        grounds no role of the viewer's could use)."""
        if not documents:
            return {}
        grounds = {g.ground for g in access.document_grants(viewer)}
        acts_for = set(await self._acts_for(viewer)) if Ground.OWN in grounds else set()
        cared: set[UUID] = set()
        if Ground.IN_CARE in grounds:
            cared = set((await self.session.scalars(select(Consultation.patient_id).where(
                Consultation.specialist_id == viewer.id, caring(self.settings.care_after_days),
                Consultation.patient_id.in_({d.patient_id for d in documents})))).all())
        theirs: set[UUID] = set()
        consultations = {d.consultation_id for d in documents if d.consultation_id is not None}
        if Ground.CONSULTATION in grounds and consultations:
            theirs = set((await self.session.scalars(select(Consultation.id).where(
                Consultation.id.in_(consultations), Consultation.specialist_id == viewer.id))).all())
        shared: set[UUID] = set()
        if Ground.SHARED in grounds:
            shared = set((await self.session.scalars(select(DocumentShare.document_id).where(
                DocumentShare.specialist_id == viewer.id,
                DocumentShare.document_id.in_({d.id for d in documents})))).all())
        found = {}
        for d in documents:
            ties = {Ground.AUTHOR} if d.author_id == viewer.id else set()
            for ground, holds in ((Ground.OWN, d.patient_id in acts_for), (Ground.IN_CARE, d.patient_id in cared),
                                  (Ground.CONSULTATION, d.consultation_id in theirs), (Ground.SHARED, d.id in shared),
                                  (Ground.INBOX, d.inbox_status is not None)):
                if holds:
                    ties.add(ground)
            found[d.id] = frozenset(ties)
        return found

    def _may_see(self, viewer: Viewer, document: Document, ties: frozenset[Ground]) -> bool:
        return access.document_visible(viewer, kind=document.kind, author_id=document.author_id,
                                       author_role=document.author_role, ready=document.status == READY,
                                       relationship=ties)

    def _visible_clause(self, viewer: Viewer) -> ColumnElement[bool]:
        since = utcnow() - dt.timedelta(days=self.settings.care_after_days)
        return visible_clause(viewer.roles, viewer.id, since)

    # --- single documents -----------------------------------------------------------------------

    async def visible(self, viewer: Viewer, document_id: UUID) -> Document:
        """The document if the caller may see it; hidden or missing: 404 (never 403)."""
        document = await self.session.get(Document, document_id)
        if document is None:
            raise NotVisible("document not found")
        ties = (await self.relationships(viewer, [document]))[document.id]
        if not self._may_see(viewer, document, ties):
            raise NotVisible("document not found")
        return document

    async def read(self, viewer: Viewer, document_id: UUID, audit: AuditTrail | None = None) -> Document:
        """A single read; staff reading a patient's document is written to the audit log."""
        document = await self.visible(viewer, document_id)
        if audit is not None:
            audit.read("document.read", "document", document.id, document.patient_id,
                       own=document.patient_id in await self._acts_for(viewer))
        return document

    async def _audit_list(self, viewer: Viewer, page: Page, audit: AuditTrail | None, asked: set[UUID]) -> None:
        """Staff listing patients' documents: one row per patient whose documents the page showed (or asked for)."""
        if audit is None:
            return
        shown = {d.patient_id for d in page.items} | asked
        for patient in sorted(shown - set(await self._acts_for(viewer))):
            audit.read("documents.list", "patient", patient, patient)

    # --- uploads --------------------------------------------------------------------------------

    async def may_upload(self, viewer: Viewer, patient_id: UUID, kind: str,
                         consultation_id: UUID | None) -> str:
        """Refuse unless the caller may upload this kind for this patient; answers the role it uploads as.

        A role that never uploads: 403; a patient the caller may not act for or see: 404."""
        if viewer.roles.isdisjoint(access.UPLOADERS):
            raise Forbidden("your role does not upload documents", "not_allowed")
        role: str | None = None
        if Role.PATIENT in viewer.roles and patient_id in await self._acts_for(viewer):
            if kind not in access.PATIENT_UPLOAD_KINDS:
                raise Forbidden("patients upload analyses, images and other files", "kind_not_allowed")
            role = Role.PATIENT
        elif access.is_clinician(viewer) and await self._in_care(viewer.id, patient_id):
            role = next(r for r in CLINICIAN_ORDER if r in viewer.roles)
        if role is None:
            raise NotVisible("patient not found")
        if consultation_id is not None:
            visit = await self.session.get(Consultation, consultation_id)
            if visit is None or visit.patient_id != patient_id or (
                    role != Role.PATIENT and visit.specialist_id != viewer.id):
                raise Invalid("no such consultation of this patient", "consultation_unknown")
        return role

    async def _in_care(self, specialist_id: UUID, patient_id: UUID) -> bool:
        return bool(await self.session.scalar(select(Consultation.id).where(
            Consultation.specialist_id == specialist_id, Consultation.patient_id == patient_id,
            caring(self.settings.care_after_days)).limit(1)))

    async def became_ready(self, document: Document) -> None:
        """The bytes passed every check: the document is ready (in the caller's transaction); an analysis the
        patient's side sent enters the methodists' inbox; the patient's side hears `document.ready`."""
        document.status = READY
        document.completed_at = utcnow()
        if document.kind == "analysis" and document.author_role == Role.PATIENT and document.inbox_status is None:
            document.inbox_status = "new"
        await self.session.flush()
        await self.session.refresh(document)
        people = await self._patient_side(document.patient_id)
        with answers_in(None):  # events are read by many people: times in UTC
            data: dict[str, Any] = msgspec.to_builtins(document_out(document))
        await streams.append(self.session, streams.staged_for(self.session), people, "document.ready", data)

    async def _patient_side(self, patient_id: UUID) -> set[UUID]:
        """Whose apps show this patient's documents: the patient (when they have a login) and the guardian."""
        patient = await self.accounts.user(patient_id)
        if patient is None:
            return set()
        return {p for p in (patient.id if patient.phone else None, patient.guardian_id) if p is not None}

    # --- chat attachments -----------------------------------------------------------------------

    async def attachable(self, viewer: Viewer, patient_id: UUID, document_ids: Iterable[UUID],
                         recipient_id: UUID | None = None) -> list[Document]:
        """The documents a message may carry: ready, of the conversation's patient, and visible to the author;
        anything else is refused alike (422 document_unknown), so a send never tells whether a document exists.

        `recipient_id`: the conversation's specialist, when the patient's side writes. What the message carries
        reaches them, so it must be theirs to see too (a psychologist is not sent a doctor's conclusion):
        422 document_not_shareable."""
        wanted = list(dict.fromkeys(document_ids))
        if not wanted:
            return []
        found = {d.id: d for d in (await self.session.scalars(select(Document).where(
            Document.id.in_(wanted), Document.patient_id == patient_id, Document.status == READY))).all()}
        ties = await self.relationships(viewer, list(found.values()))
        if len(found) != len(wanted) or not all(self._may_see(viewer, d, ties[d.id]) for d in found.values()):
            raise Invalid("unknown document", "document_unknown")
        recipient = await self.accounts.user(recipient_id) if recipient_id is not None else None
        if recipient is not None:
            reader = Viewer(id=recipient.id, roles=frozenset(Role(r) for r in recipient.roles if r in ROLE_NAMES))
            theirs = await self.relationships(reader, list(found.values()))
            hidden = [d.id for d in found.values() if not self._may_see(reader, d, theirs[d.id])]
            if hidden:
                raise Invalid("the specialist of this conversation may not see this document",
                              "document_not_shareable", document_ids=[str(i) for i in hidden])
        return [found[i] for i in wanted]

    # --- the methodists' inbox -------------------------------------------------------------------

    async def inbox(self, viewer: Viewer, status: str, limit: int, cursor: UUID | None,
                    audit: AuditTrail | None = None) -> Page:
        """Analyses the patients' side sent, in one status, oldest first. Methodists see them all; a doctor or
        psychologist those the mask shows them: their patients' (in care) and those forwarded to them."""
        query = select(Document).where(Document.kind == "analysis", Document.inbox_status == status,
                                       self._visible_clause(viewer))
        if cursor is not None:
            query = query.where(Document.id > cursor)
        rows = (await self.session.scalars(query.order_by(Document.id).limit(limit + 1))).all()
        page = _page(rows, limit)
        await self._audit_list(viewer, page, audit, set())
        return page

    async def _in_inbox(self, viewer: Viewer, document_id: UUID) -> Document:
        document = await self.visible(viewer, document_id)
        if document.kind != "analysis" or document.inbox_status is None:
            raise NotVisible("analysis not found")
        return document

    async def _move(self, viewer: Viewer, document: Document, sources: tuple[str, ...], target: str) -> None:
        """Compare-and-set on the inbox status: of two people moving one analysis at once, one wins."""
        moved = await self.session.execute(
            update(Document).where(Document.id == document.id, Document.inbox_status.in_(sources))
            .values(inbox_status=target, inbox_changed_by=viewer.id, updated_at=utcnow()).returning(Document.id))
        if moved.one_or_none() is None:
            await self.session.refresh(document)
            raise Conflict("the analysis was handled meanwhile", "inbox_status_changed",
                           inbox_status=document.inbox_status)
        await self.session.refresh(document)

    async def forward(self, viewer: Viewer, document_id: UUID, specialist_id: UUID, note: str | None) -> Document:
        """Hand a new analysis to a specialist, who from then on sees it and its patient's card, and is told."""
        document = await self._in_inbox(viewer, document_id)
        try:
            specialist = await self.accounts.specialist(specialist_id)
        except NotVisible:
            specialist = None
        if specialist is None or not specialist.active:
            raise Invalid("no active specialist with this id", "specialist_unknown")
        await self._move(viewer, document, ("new",), "forwarded")
        self.session.add(DocumentShare(document_id=document.id, specialist_id=specialist.id, forwarded_by=viewer.id,
                                       note=note.strip() if note and note.strip() else None))
        await self.session.flush()
        notice = {"kind": "analysis_forwarded", "document_id": str(document.id)}  # ids only: no medical content
        outbox.stage(self.session, "notice", document.id, [str(specialist.id)], notice)
        await streams.append(self.session, streams.staged_for(self.session), {specialist.id}, "notice", notice)
        return document

    async def processed(self, viewer: Viewer, document_id: UUID) -> Document:
        document = await self._in_inbox(viewer, document_id)
        await self._move(viewer, document, ("new", "forwarded"), "processed")
        return document
