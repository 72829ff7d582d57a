"""What crosses the wire for documents: the shapes the API contract fixes."""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Literal
from uuid import UUID

from msgspec import Meta

from app.documents.models import Document
from app.schemas import Out, Wire

Kind = Literal["analysis", "conclusion", "referral", "image", "other"]
Filename = Annotated[str, Meta(min_length=1, max_length=255)]
ContentType = Annotated[str, Meta(min_length=3, max_length=100)]


class DocumentIn(Wire):
    patient_id: UUID
    kind: Kind
    filename: Filename
    content_type: ContentType
    size: Annotated[int, Meta(ge=1)]
    consultation_id: UUID | None = None


class DocumentOut(Out):
    id: UUID
    patient_id: UUID
    kind: str
    filename: str
    content_type: str
    size: int
    status: str  # pending | ready | rejected
    author_id: UUID
    author_role: str
    consultation_id: UUID | None
    conversation_id: UUID | None
    created_at: dt.datetime
    inbox_status: str | None  # new | forwarded | processed for analyses, else null


class UploadOut(Out):
    url: str
    method: str
    headers: dict[str, str]


class CreatedOut(Out):
    document: DocumentOut
    upload: UploadOut


class AttachedOut(Out):
    """A document as a chat message carries it."""

    id: UUID
    filename: str
    content_type: str
    size: int
    kind: str


def document_out(document: Document) -> DocumentOut:
    return DocumentOut(id=document.id, patient_id=document.patient_id, kind=document.kind,
                       filename=document.filename, content_type=document.content_type, size=document.size,
                       status=document.status, author_id=document.author_id, author_role=document.author_role,
                       consultation_id=document.consultation_id, conversation_id=document.conversation_id,
                       created_at=document.created_at, inbox_status=document.inbox_status)
