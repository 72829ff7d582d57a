"""Thin HTTP handlers for chat lists, history, sending and read marks."""

from __future__ import annotations

from typing import Annotated, Any
from uuid import UUID

from litestar import Controller, Request, Response, delete, get, patch, post
from litestar.datastructures import State
from litestar.di import NamedDependency, Provide
from litestar.params import FromPath, FromQuery, JSONBody, Parameter
from sqlalchemy.ext.asyncio import AsyncSession

from app.access import Viewer
from app.audit.service import audit_trail
from app.chat import reads
from app.chat.schemas import ChatRowOut, EditIn, MessageIn, MessageOut, ReadIn
from app.chat.service import ChatService, outgoing
from app.chat.store import message_out
from app.documents.models import Document
from app.schemas import Page, localized
from app.services import chat_for, documents_for

Limit = Annotated[int, Parameter(ge=1, le=200)]


async def provide_chat(db_session: NamedDependency[AsyncSession], state: State) -> ChatService:
    return chat_for(db_session, state)


async def attachments(state: State, viewer: Viewer, conversation_id: UUID, document_ids: list[UUID]) -> list[Document]:
    """The documents a send names, checked before it joins the send queue (whose groups stay one round trip):
    ready, of this conversation's patient, and visible to the author; else 422 document_unknown."""
    async with state.database.reader() as session:
        party = await chat_for(session, state).visible(viewer, conversation_id)
        recipient = party.specialist_id if viewer.id != party.specialist_id else None
        return await documents_for(session, state).attachable(viewer, party.patient_id, document_ids, recipient)


class ChatController(Controller):
    path = "/api/v1/chats"
    tags = ["chat"]
    dependencies = {"chat": Provide(provide_chat)}

    @get("/")
    async def list_chats(self, request: Request[Viewer, Any, Any]) -> Page[ChatRowOut]:
        state = request.app.state
        return Page(items=await reads.chat_list(state.database.reads, state.presence, request.user))

    @get("/{conversation_id:uuid}/messages")
    async def list_messages(self, request: Request[Viewer, Any, Any], conversation_id: FromPath[UUID],
                            before: FromQuery[UUID | None] = None, after: FromQuery[UUID | None] = None,
                            limit: FromQuery[Limit] = 50) -> Page[MessageOut]:
        rows = await reads.history(request.app.state.database.reads, request.user, conversation_id, before, after,
                                   limit, audit_trail(request))
        return Page(items=rows, next_cursor=str(rows[0].id) if len(rows) == limit and after is None else
                    (str(rows[-1].id) if len(rows) == limit else None))

    @post("/{conversation_id:uuid}/messages")
    async def send_message(self, request: Request[Viewer, Any, Any], state: State, conversation_id: FromPath[UUID],
                           data: JSONBody[MessageIn]) -> Response[MessageOut]:
        # no session of its own: the send joins the next group the send queue writes
        attached = await attachments(state, request.user, conversation_id, data.document_ids) \
            if data.document_ids else []
        message, created = await state.sends.send(outgoing(request.user, conversation_id, data, attached))
        return Response(localized(message), status_code=201 if created else 200)

    @patch("/{conversation_id:uuid}/messages/{message_id:uuid}")
    async def edit_message(self, request: Request[Viewer, Any, Any], chat: NamedDependency[ChatService],
                           conversation_id: FromPath[UUID], message_id: FromPath[UUID],
                           data: JSONBody[EditIn]) -> MessageOut:
        return message_out(await chat.revise(request.user, conversation_id, message_id, data.text))

    @delete("/{conversation_id:uuid}/messages/{message_id:uuid}", status_code=200)
    async def delete_message(self, request: Request[Viewer, Any, Any], chat: NamedDependency[ChatService],
                             conversation_id: FromPath[UUID], message_id: FromPath[UUID]) -> MessageOut:
        return message_out(await chat.revise(request.user, conversation_id, message_id, None))

    @post("/{conversation_id:uuid}/read", status_code=204)
    async def mark_read(self, request: Request[Viewer, Any, Any], chat: NamedDependency[ChatService],
                        conversation_id: FromPath[UUID], data: JSONBody[ReadIn]) -> None:
        await chat.mark_read(request.user, conversation_id, data.up_to_message_id)
