"""What crosses the wire for chat."""

from __future__ import annotations

import datetime as dt
from typing import Annotated
from uuid import UUID

import msgspec
from msgspec import Meta

from app.documents.schemas import AttachedOut
from app.schemas import TEXT, Out, Wire

# any 1 to 64 printable characters the client picks; a retry with the same one is a no-op
ClientId = Annotated[str, Meta(min_length=1, max_length=64, pattern=r"^[\x21-\x7e]+$")]


class MessageIn(Wire):
    client_id: ClientId
    text: Annotated[str, Meta(max_length=4000, pattern=TEXT)] | None = None
    document_ids: Annotated[list[UUID], Meta(max_length=10)] = msgspec.field(default_factory=list)


class MessageOut(Out):
    id: UUID
    conversation_id: UUID
    author_id: UUID | None
    kind: str
    text: str
    document_ids: list[str]
    client_id: str
    created_at: dt.datetime
    edited_at: dt.datetime | None = None
    deleted: bool = False
    documents: list[AttachedOut] = msgspec.field(default_factory=list)  # what document_ids name, as shown


class EditIn(Wire):
    text: Annotated[str, Meta(min_length=1, max_length=4000, pattern=TEXT)]


class ReadIn(Wire):
    up_to_message_id: UUID


class ExtendIn(Wire):
    until: Annotated[dt.datetime, Meta(tz=True)]  # an instant: a zone-less time would mean a different one per reader


class LastMessage(Out):
    id: UUID
    author_id: UUID | None
    kind: str
    text: str
    created_at: dt.datetime


class ChatRowOut(Out):
    conversation_id: UUID
    patient_id: UUID
    specialist_id: UUID
    counterpart_name: str | None  # the specialist for a patient; the patient (masked) for a specialist
    is_dependent: bool
    writable: bool
    writable_until: dt.datetime | None
    unread: int
    last_message: LastMessage | None
    consultation_id: UUID | None = None  # a specialist's row per consultation
    specialty: str | None = None
    online: bool | None = None  # whether the other side has the app open (shown to specialists)


class ConversationOut(Out):
    id: UUID
    patient_id: UUID
    specialist_id: UUID
    writable: bool
    writable_until: dt.datetime | None
