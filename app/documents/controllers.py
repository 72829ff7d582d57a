"""Thin HTTP handlers for reading documents and working the methodists' inbox (uploads: upload_controllers.py)."""

from __future__ import annotations

from typing import Annotated, Any, Literal
from uuid import UUID

from litestar import Controller, Request, get, post
from litestar.datastructures import State
from litestar.di import NamedDependency, Provide
from litestar.params import FromPath, FromQuery, JSONBody, Parameter
from msgspec import Meta
from sqlalchemy.ext.asyncio import AsyncSession

from app import params
from app.access import INBOX_ROLES, Viewer, only_roles
from app.accounts.controllers import parse_cursor
from app.audit.service import audit_trail
from app.documents import reads
from app.documents.schemas import DocumentOut, Kind, document_out
from app.documents.service import DocumentService, Page
from app.schemas import Page as PageOut
from app.schemas import Wire
from app.services import documents_for

Limit = Annotated[int, Parameter(ge=1, le=100)]
InboxStatus = Literal["new", "forwarded", "processed"]


async def provide_documents(db_session: NamedDependency[AsyncSession], state: State) -> DocumentService:
    return documents_for(db_session, state)


class ForwardIn(Wire):
    specialist_id: UUID
    note: Annotated[str, Meta(max_length=1000)] | None = None


def page_out(page: Page) -> PageOut[DocumentOut]:
    return PageOut(items=[document_out(d) for d in page.items], next_cursor=page.next_cursor)


# a plain handler, not a method: the uploads' controller shares this path (POST), and Litestar takes one
# controller per path
@get("/api/v1/documents", tags=["documents"])
async def list_documents(request: Request[Viewer, Any, Any], patient_id: FromQuery[UUID | None] = None,
                         kind: FromQuery[Kind | None] = None, limit: FromQuery[Limit] = 50,
                         cursor: params.Cursor = None) -> PageOut[DocumentOut]:
    state = request.app.state
    return await reads.documents(state.database.reads, request.user, patient_id, kind, limit, parse_cursor(cursor),
                                 state.settings.care_after_days, audit_trail(request))


class DocumentController(Controller):
    path = "/api/v1/documents"
    tags = ["documents"]
    dependencies = {"documents": Provide(provide_documents)}

    @get("/{document_id:uuid}")
    async def get_document(self, request: Request[Viewer, Any, Any], documents: NamedDependency[DocumentService],
                           document_id: FromPath[UUID]) -> DocumentOut:
        return document_out(await documents.read(request.user, document_id, audit=audit_trail(request)))

    @post("/{document_id:uuid}/forward", status_code=200, opt=only_roles(*INBOX_ROLES))
    async def forward_document(self, request: Request[Viewer, Any, Any], documents: NamedDependency[DocumentService],
                               document_id: FromPath[UUID], data: JSONBody[ForwardIn]) -> DocumentOut:
        return document_out(await documents.forward(request.user, document_id, data.specialist_id, data.note))

    @post("/{document_id:uuid}/processed", status_code=200, opt=only_roles(*INBOX_ROLES))
    async def mark_processed(self, request: Request[Viewer, Any, Any], documents: NamedDependency[DocumentService],
                             document_id: FromPath[UUID]) -> DocumentOut:
        return document_out(await documents.processed(request.user, document_id))


class InboxController(Controller):
    path = "/api/v1/analyses"
    tags = ["documents"]
    dependencies = {"documents": Provide(provide_documents)}

    @get("/inbox", opt=only_roles(*INBOX_ROLES))
    async def list_inbox(self, request: Request[Viewer, Any, Any], documents: NamedDependency[DocumentService],
                         status: FromQuery[InboxStatus] = "new", limit: FromQuery[Limit] = 50,
                         cursor: params.Cursor = None) -> PageOut[DocumentOut]:
        return page_out(await documents.inbox(request.user, status, limit, parse_cursor(cursor),
                                              audit=audit_trail(request)))
