"""What the documents inbox grants beyond documents, in a module that imports no service: the card read
(app/consultations/card.py) asks it whether a caller may read a patient's card because of an analysis."""

from __future__ import annotations

from typing import Any

from sqlalchemy import exists

from app.access import Role
from app.documents.models import Document, DocumentShare

SHARED_WITH = frozenset({Role.DOCTOR, Role.PSYCHOLOGIST, Role.SONOGRAPHER, Role.MASSAGE_THERAPIST})


def in_inbox(patient_id: Any) -> Any:
    """SQL: an analysis of this patient is in the methodists' inbox."""
    return exists().where(Document.patient_id == patient_id, Document.kind == "analysis",
                          Document.inbox_status.is_not(None))


def shared_with(specialist_id: Any, patient_id: Any) -> Any:
    """SQL: an analysis of this patient was forwarded to this specialist."""
    return exists().where(DocumentShare.specialist_id == specialist_id, DocumentShare.document_id == Document.id,
                          Document.patient_id == patient_id)
