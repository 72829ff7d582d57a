"""The chat's hot reads (app/reads.py): the chat list and a conversation's history, each one statement.

A chat list row carries its conversation's window, the caller's unread count and the last message, each a
correlated subquery on the message index (conversation_id, id), so the list costs one statement however long
it is. Who sees a conversation's history is decided as for every chat action (app/chat/service.py, people_of);
a list holds the specialist's live consultations, or the conversations of the caller and their dependents.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from typing import Any
from uuid import UUID

from sqlalchemy import Select, and_, bindparam, func, join, literal_column, or_, select
from sqlalchemy.orm import aliased

from app import access
from app.access import Viewer
from app.accounts.models import User
from app.accounts.service import initials
from app.audit.service import AuditTrail
from app.chat.hub import Presence
from app.chat.models import ChatWindow, Conversation, Message, ReadMark
from app.chat.schemas import ChatRowOut, LastMessage, MessageOut
from app.chat.service import people_of, window_of
from app.chat.store import attached
from app.consultations.models import Consultation
from app.consultations.service import LIVE
from app.errors import NotVisible
from app.reads import Reads, Row

SPECIALIST_ROWS = 1000  # a specialist's list: their live consultations, the earliest first

_mark = aliased(ReadMark, name="mark")
_last = aliased(Message, name="last")
_newest = aliased(Message, name="newest")
_unread = aliased(Message, name="unread")
_window = aliased(ChatWindow, name="window")


def _fixed(value: int) -> Any:
    """A number written into the statement: a statement's only parameters are the ones its caller names."""
    return literal_column(str(int(value)))


def _in(column: Any, values: Sequence[str]) -> Any:
    """`column IN ('a', 'b')` with the values written into the statement (fixed values, no parameters)."""
    return column.in_([literal_column("'" + value.replace("'", "''") + "'") for value in values])


def _chat_rows(source: Any, *columns: Any) -> Select[Any]:
    """A list row per conversation `source` joins, for the caller `uid`: its window's end, the caller's unread
    count (the others' messages after the caller's read mark) and its last message, beside `columns`."""
    conversation = Conversation
    planned_end = (select(func.max(_window.ends_at)).where(_window.conversation_id == conversation.id)
                   .scalar_subquery())
    unread = (select(func.count()).select_from(_unread).where(
        _unread.conversation_id == conversation.id,
        or_(_unread.author_id.is_(None), _unread.author_id != bindparam("uid")),
        or_(_mark.last_read_id.is_(None), _unread.id > _mark.last_read_id)).scalar_subquery())
    last_id = (select(_newest.id).where(_newest.conversation_id == conversation.id)  # PostgreSQL has no max(uuid)
               .order_by(_newest.id.desc()).limit(_fixed(1)).scalar_subquery())
    return select(
        conversation.id.label("conversation_id"), conversation.patient_id, conversation.specialist_id,
        conversation.extended_until, planned_end.label("planned_end"), unread.label("unread"),
        _last.id.label("last_id"), _last.author_id.label("last_author_id"), _last.kind.label("last_kind"),
        _last.text.label("last_text"), _last.created_at.label("last_created_at"), *columns,
    ).select_from(source.outerjoin(_mark, and_(_mark.conversation_id == conversation.id,
                                               _mark.user_id == bindparam("uid")))
                  .outerjoin(_last, _last.id == last_id))


_visit = (select(Consultation.id, Consultation.patient_id, Consultation.specialty, Consultation.conversation_id,
                 Consultation.starts_at)
          .where(Consultation.specialist_id == bindparam("uid"), _in(Consultation.status, LIVE))
          .order_by(Consultation.starts_at, Consultation.id).limit(_fixed(SPECIALIST_ROWS)).subquery("visit"))
_patient = aliased(User, name="patient")

# a specialist's list: a row per live consultation (the earliest first); one patient's rows share a history
SPECIALIST_LIST = _chat_rows(
    _visit.join(Conversation, Conversation.id == _visit.c.conversation_id)
    .outerjoin(_patient, _patient.id == _visit.c.patient_id),
    _visit.c.id.label("consultation_id"), _visit.c.specialty, _patient.full_name.label("patient_name"),
    _patient.guardian_id.label("patient_guardian_id"),
).order_by(_visit.c.starts_at, _visit.c.id)

_acting = aliased(User, name="acting")  # the caller and their dependents
_specialist = aliased(User, name="specialist")

# a patient's (or guardian's) list: a row per conversation of theirs or their dependents', latest first
PATIENT_LIST = _chat_rows(
    join(_acting, Conversation, Conversation.patient_id == _acting.id)
    .outerjoin(_specialist, and_(_specialist.id == Conversation.specialist_id, _specialist.is_staff.is_(True))),
    _specialist.full_name.label("specialist_name"),
).where(or_(_acting.id == bindparam("uid"), _acting.guardian_id == bindparam("uid"))
        ).order_by(func.coalesce(_last.id, Conversation.id).desc())


def _history(*, newer: bool, older: bool) -> Select[Any]:
    """The conversation's people, outer-joined to one page of its messages: a row with no message when there
    are none, no row when the conversation does not exist."""
    page = [Message.conversation_id == Conversation.id]
    if newer:
        page.append(Message.id > bindparam("cursor"))
    if older:
        page.append(Message.id < bindparam("cursor"))
    return (select(Conversation.specialist_id, Conversation.patient_id, Conversation.patient_has_login,
                   Conversation.guardian_id, Message.id, Message.author_id, Message.kind, Message.text,
                   Message.document_ids, Message.documents, Message.client_id, Message.created_at,
                   Message.edited_at, Message.deleted_at)
            .outerjoin_from(Conversation, Message, and_(*page))
            .where(Conversation.id == bindparam("conversation_id"))
            .order_by(Message.id if newer else Message.id.desc()).limit(bindparam("limit")))


LATEST_PAGE = _history(newer=False, older=False)
OLDER_PAGE = _history(newer=False, older=True)
NEWER_PAGE = _history(newer=True, older=False)


def _last_message(row: Row) -> LastMessage | None:
    if row["last_id"] is None:
        return None
    return LastMessage(id=row["last_id"], author_id=row["last_author_id"], kind=row["last_kind"],
                       text=row["last_text"], created_at=row["last_created_at"])


def _row_out(row: Row, now: dt.datetime, name: str | None, is_dependent: bool, **extra: Any) -> ChatRowOut:
    window = window_of(row["extended_until"], row["planned_end"], now)
    return ChatRowOut(conversation_id=row["conversation_id"], patient_id=row["patient_id"],
                      specialist_id=row["specialist_id"], counterpart_name=name, is_dependent=is_dependent,
                      writable=window.writable, writable_until=window.until, unread=row["unread"],
                      last_message=_last_message(row), **extra)


class _PatientNames:
    """Patients as a specialist's list names them: through the card mask, the name or else the initials. The
    mask depends only on whether the patient is the viewer or their dependent, so it is worked out once each."""

    __slots__ = ("_masks", "_viewer")

    def __init__(self, viewer: Viewer) -> None:
        self._viewer = viewer
        self._masks: dict[bool, frozenset[str]] = {}

    def __call__(self, row: Row) -> str | None:
        full_name: str | None = row["patient_name"]
        if full_name is None:  # no such account: no card
            return None
        patient_id, viewer = row["patient_id"], self._viewer
        ward = row["patient_guardian_id"] == viewer.id
        own = ward or patient_id == viewer.id
        visible = self._masks.get(own)
        if visible is None:
            visible = self._masks[own] = access.visible_card_fields(viewer, patient_id, [patient_id] if ward else [])
        return (full_name if "full_name" in visible else None) or (initials(full_name) if "initials" in visible
                                                                   else None)


async def chat_list(reads: Reads, presence: Presence, viewer: Viewer) -> list[ChatRowOut]:
    now = dt.datetime.now(dt.UTC)
    if access.is_clinician(viewer):
        rows = await reads.all(SPECIALIST_LIST, uid=viewer.id)
        online = await presence.online(list(dict.fromkeys(r["patient_id"] for r in rows))) if rows else set()
        name = _PatientNames(viewer)
        return [_row_out(r, now, name(r), False, consultation_id=r["consultation_id"], specialty=r["specialty"],
                         online=r["patient_id"] in online) for r in rows]
    return [_row_out(r, now, r["specialist_name"], r["patient_id"] != viewer.id)
            for r in await reads.all(PATIENT_LIST, uid=viewer.id)]


def _message(conversation_id: UUID, row: Row) -> MessageOut:
    return MessageOut(id=row["id"], conversation_id=conversation_id, author_id=row["author_id"], kind=row["kind"],
                      text=row["text"], document_ids=list(row["document_ids"]), client_id=row["client_id"],
                      created_at=row["created_at"], edited_at=row["edited_at"], deleted=row["deleted_at"] is not None,
                      documents=attached(row["documents"]))


async def history(reads: Reads, viewer: Viewer, conversation_id: UUID, before: UUID | None, after: UUID | None,
                  limit: int, audit: AuditTrail) -> list[MessageOut]:
    """A page of the conversation, oldest first: the latest `limit` messages, those before a message, or those
    after one. 404 unless the caller is one of its people; the specialist's read is audited."""
    if after is not None:
        rows = await reads.all(NEWER_PAGE, conversation_id=conversation_id, cursor=after, limit=limit)
    elif before is not None:
        rows = await reads.all(OLDER_PAGE, conversation_id=conversation_id, cursor=before, limit=limit)
    else:
        rows = await reads.all(LATEST_PAGE, conversation_id=conversation_id, limit=limit)
    if not rows:
        raise NotVisible("conversation not found")
    party = rows[0]
    patient_login = party["patient_id"] if party["patient_has_login"] else None
    if viewer.id not in people_of(party["specialist_id"], patient_login, party["guardian_id"]):
        raise NotVisible("conversation not found")
    # the specialist's read is audited; the patient's or guardian's own is not
    audit.read("chat.read", "conversation", conversation_id, party["patient_id"],
               own=viewer.id in (patient_login, party["guardian_id"]))
    messages = [_message(conversation_id, r) for r in rows if r["id"] is not None]
    return messages if after is not None else messages[::-1]
