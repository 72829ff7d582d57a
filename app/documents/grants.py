"""What the documents inbox grants beyond documents, in a module that imports no service: the consultation
service asks it whether a caller may read a patient's card because of an analysis (no import cycle)."""

from __future__ import annotations

from uuid import UUID

from sqlalchemy import exists, or_, select
from sqlalchemy.ext.asyncio import AsyncSession

from app.access import Role, Viewer
from app.documents.models import Document, DocumentShare


async def card_granted(session: AsyncSession, viewer: Viewer, patient_id: UUID) -> bool:
    """A methodist reads the card (masked to what identifies the patient) of anyone behind an analysis in the
    inbox; a specialist an analysis was forwarded to reads the card of its patient."""
    reasons = []
    if Role.METHODIST in viewer.roles:
        reasons.append(exists().where(Document.patient_id == patient_id, Document.kind == "analysis",
                                      Document.inbox_status.is_not(None)))
    if viewer.roles & {Role.DOCTOR, Role.PSYCHOLOGIST, Role.SONOGRAPHER, Role.MASSAGE_THERAPIST}:
        reasons.append(exists().where(DocumentShare.specialist_id == viewer.id,
                                      DocumentShare.document_id == Document.id, Document.patient_id == patient_id))
    if not reasons:
        return False
    return bool(await session.scalar(select(or_(*reasons))))
