"""Chat rules: conversations and their writing windows, sending, edits, read marks (the chat list and history
are read in app/chat/reads.py).

Every change appends its realtime events to the recipients' streams in the same transaction; the request's
session publishes them once committed (app/db.py). No HTTP here.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from uuid import UUID

import msgspec
from sqlalchemy import delete, select, update
from sqlalchemy.ext.asyncio import AsyncSession
from uuid_utils.compat import uuid7

from app.access import Viewer
from app.accounts.service import AccountService
from app.chat import streams
from app.chat.hub import Presence
from app.chat.models import ChatWindow, Conversation, Message, ReadMark
from app.chat.schemas import MessageIn, MessageOut
from app.chat.store import PartyRow, Send, SendStore, SqlSendStore, message_out
from app.db import insert_ignoring_duplicates
from app.documents.models import Document
from app.documents.schemas import AttachedOut
from app.errors import Conflict, DomainError, Forbidden, Invalid, NotVisible, TooMany
from app.limits import RateLimiter
from app.settings import Settings
from app.timeparams import answers_in


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def message_data(m: Message) -> dict[str, Any]:
    """message.new carries the message exactly as the REST answer shapes it (in UTC: many people read it)."""
    with answers_in(None):
        data: dict[str, Any] = msgspec.to_builtins(message_out(m))
    return data


@dataclass(frozen=True, slots=True)
class Window:
    writable: bool
    until: dt.datetime | None


@dataclass(frozen=True, slots=True)
class Party:
    """A conversation's people and whether it takes messages: what every chat action needs, in one query."""

    conversation_id: UUID
    specialist_id: UUID
    patient_id: UUID
    patient_login: UUID | None  # the patient, or None for a dependent (who has no login)
    guardian_id: UUID | None
    window: Window

    @property
    def people(self) -> set[UUID]:
        """Everyone whose apps show this conversation."""
        return people_of(self.specialist_id, self.patient_login, self.guardian_id)


def people_of(specialist_id: UUID, patient_login: UUID | None, guardian_id: UUID | None) -> set[UUID]:
    """Who sees a conversation: its specialist, its patient when they have a login, a dependent's guardian."""
    return {specialist_id} | {p for p in (patient_login, guardian_id) if p is not None}


def parties_of(rows: list[PartyRow]) -> dict[UUID, Party]:
    now = utcnow()
    return {row.id: Party(row.id, row.specialist_id, row.patient_id,
                          row.patient_id if row.patient_has_login else None, row.guardian_id,
                          window_of(row.extended_until, row.planned_end, now)) for row in rows}


Sent = tuple[MessageOut, bool]  # the message as answered, and whether this send wrote it


def outgoing(viewer: Viewer, conversation_id: UUID, body: MessageIn, attached: Sequence[Document] = ()) -> Send:
    """What a send asks for, once its body makes sense on its own. `attached`: the documents `document_ids`
    names, already checked against the conversation's patient and the author's mask (DocumentService.attachable)."""
    if {d.id for d in attached} != set(body.document_ids):
        raise Invalid("unknown document", "document_unknown")
    text = (body.text or "").strip()
    if not text and not attached:
        raise Invalid("a message needs text or documents", "message_empty")
    return Send(viewer.id, conversation_id, text, body.client_id,
                documents=tuple(AttachedOut(id=d.id, filename=d.filename, content_type=d.content_type, size=d.size,
                                            kind=d.kind) for d in attached),
                analyses=tuple(d.id for d in attached if d.kind == "analysis" and d.author_role == "patient"))


class ChatService:
    def __init__(self, session: AsyncSession, settings: Settings, accounts: AccountService,
                 limiter: RateLimiter, presence: Presence) -> None:
        self.session = session
        self.settings = settings
        self.accounts = accounts
        self.limiter = limiter
        self.presence = presence

    @property
    def staged(self) -> streams.Staged:
        return streams.staged_for(self.session)

    # --- conversations and their windows (called by the consultation service) ------------------

    async def conversation_for(self, patient_id: UUID, specialist_id: UUID) -> Conversation:
        pair = (Conversation.patient_id == patient_id, Conversation.specialist_id == specialist_id)
        found = await self.session.scalar(select(Conversation).where(*pair))
        if found is None:  # two first bookings at once: one insert wins, both read it
            now = utcnow()
            patient = await self.accounts.user(patient_id)
            await insert_ignoring_duplicates(self.session, Conversation, [{
                "id": uuid7(), "patient_id": patient_id, "specialist_id": specialist_id,
                "guardian_id": patient.guardian_id if patient else None,
                "patient_has_login": bool(patient and patient.phone), "created_at": now, "updated_at": now}])
            found = await self.session.scalar(select(Conversation).where(*pair))
        assert found is not None
        return found

    async def open_window(self, conversation_id: UUID, consultation_id: UUID, ends_at: dt.datetime) -> None:
        now = utcnow()
        opened = await insert_ignoring_duplicates(self.session, ChatWindow, [{
            "id": uuid7(), "conversation_id": conversation_id, "consultation_id": consultation_id,
            "ends_at": ends_at, "created_at": now, "updated_at": now}])
        if opened:
            await self._announce_window(conversation_id, "conversation.opened")

    async def close_window(self, consultation_id: UUID) -> None:
        gone = await self.session.execute(delete(ChatWindow).where(ChatWindow.consultation_id == consultation_id)
                                          .returning(ChatWindow.conversation_id))
        conversation_id = gone.scalar_one_or_none()
        if conversation_id is not None and not (await self._party(conversation_id)).window.writable:
            await self._announce_window(conversation_id, "conversation.closed")

    async def extend(self, conversation_id: UUID, until: dt.datetime) -> Window:
        now = utcnow()
        if until.tzinfo is None:
            raise Invalid("give the time with its offset", "time_invalid")
        if not now < until <= now + dt.timedelta(days=self.settings.chat_max_extension_days):
            raise Invalid(f"extend into the next {self.settings.chat_max_extension_days} days", "extension_invalid")
        await self.session.execute(update(Conversation).where(Conversation.id == conversation_id)
                                   .values(extended_until=until, updated_at=now))
        text = f"Chat extended until {until.astimezone(dt.UTC).strftime('%Y-%m-%d %H:%M')} UTC"
        await self.post_system(conversation_id, text, "extended")
        await self._announce_window(conversation_id, "conversation.extended")
        return (await self._party(conversation_id)).window

    async def post_system(self, conversation_id: UUID, text: str, kind: str) -> Message:
        """A message from the clinic itself: a reminder, an extension, a missed call."""
        return (await self.post_system_many([(conversation_id, text, kind)]))[0]

    async def post_system_many(self, posts: Sequence[tuple[UUID, str, str]],
                               parties: dict[UUID, Party] | None = None) -> list[Message]:
        """Many clinic messages `(conversation_id, text, kind)` at once (e.g. the missed calls a keeper ends
        together): one insert, one read of the people (none when `parties` has them), one append of events."""
        messages = [Message(id=uuid7(), conversation_id=c, author_id=None, kind="system", text=text,
                            document_ids=[], client_id=f"system:{kind}:{uuid7()}") for c, text, kind in posts]
        if not messages:
            return []
        self.session.add_all(messages)
        await self.session.flush()
        wanted = {m.conversation_id for m in messages}
        if parties is None or not wanted <= parties.keys():
            parties = await self._parties(wanted)
        if not wanted <= parties.keys():
            raise NotVisible("conversation not found")
        await streams.append_many(self.session, self.staged, [
            (parties[m.conversation_id].people, "message.new", message_data(m)) for m in messages])
        return messages

    async def parties(self, conversation_ids: set[UUID]) -> dict[UUID, Party]:
        """The people of many conversations in one query (unknown ones left out)."""
        return await self._parties(conversation_ids) if conversation_ids else {}

    async def announce(self, conversation_id: UUID, type_: str, data: dict[str, Any],
                       patient_side: bool = False) -> None:
        """An event for everyone whose apps show this conversation (e.g. its consultation changed), or only
        for the patient's side of it (the patient's own app and a guardian's)."""
        party = await self._party(conversation_id)
        people = party.people - {party.specialist_id} if patient_side else party.people
        await streams.append(self.session, self.staged, people, type_, data)

    async def notify(self, user_ids: set[UUID], data: dict[str, Any]) -> None:
        """A `notice` event for each of these users (ids and kinds only: no medical content)."""
        await streams.append(self.session, self.staged, user_ids, "notice", data)

    async def _announce_window(self, conversation_id: UUID, type_: str) -> None:
        party = await self._party(conversation_id)
        window = party.window
        await streams.append(self.session, self.staged, party.people, type_, {
            "conversation_id": str(conversation_id), "writable": window.writable,
            "writable_until": window.until.isoformat() if window.until else None})

    # --- reading and writing --------------------------------------------------------------------

    async def _party(self, conversation_id: UUID) -> Party:
        party = (await self._parties({conversation_id})).get(conversation_id)
        if party is None:
            raise NotVisible("conversation not found")
        return party

    async def _parties(self, conversation_ids: set[UUID]) -> dict[UUID, Party]:
        return parties_of(await SqlSendStore(self.session).parties(sorted(conversation_ids)))

    async def visible(self, viewer: Viewer, conversation_id: UUID) -> Party:
        """The conversation if the viewer is in it (the specialist, the patient, the patient's guardian)."""
        party = await self._party(conversation_id)
        if viewer.id not in party.people:
            raise NotVisible("conversation not found")
        return party

    async def revise(self, viewer: Viewer, conversation_id: UUID, message_id: UUID, text: str | None) -> Message:
        """Edit (text) or delete (None) one's own message, shortly after sending it, while the chat is open."""
        party = await self.visible(viewer, conversation_id)
        message = await self.session.get(Message, message_id)
        if message is None or message.conversation_id != conversation_id:
            raise NotVisible("message not found")
        if message.author_id != viewer.id:
            raise Forbidden("only the author changes a message", "not_author")
        if message.deleted_at is not None:
            raise Conflict("the message was deleted", "message_deleted")
        now = utcnow()
        if now - message.created_at > dt.timedelta(seconds=self.settings.chat_edit_seconds):
            raise Conflict("too late to change this message", "edit_window_over")
        if not party.window.writable:
            raise Conflict("the conversation is closed for writing", "conversation_closed")
        if text is None:
            message.text, message.document_ids, message.documents, message.deleted_at = "", [], [], now
        else:
            if not text.strip():
                raise Invalid("a message needs text", "message_empty")
            message.text, message.edited_at = text.strip(), now
        await self.session.flush()
        await streams.append(self.session, self.staged, party.people, "message.updated", message_data(message))
        return message

    async def mark_read(self, viewer: Viewer, conversation_id: UUID, up_to: UUID) -> None:
        party = await self.visible(viewer, conversation_id)
        message = await self.session.get(Message, up_to)
        if message is None or message.conversation_id != conversation_id:
            raise NotVisible("message not found")
        mark = await self.session.scalar(select(ReadMark).where(ReadMark.conversation_id == conversation_id,
                                                                ReadMark.user_id == viewer.id))
        if mark is not None and mark.last_read_id >= up_to:
            return  # marks only move forward
        if mark is None:
            self.session.add(ReadMark(conversation_id=conversation_id, user_id=viewer.id, last_read_id=up_to))
        else:
            mark.last_read_id = up_to
        await self.session.flush()
        await streams.append(self.session, self.staged, party.people - {viewer.id}, "message.read", {
            "conversation_id": str(conversation_id), "user_id": str(viewer.id), "up_to_message_id": str(up_to)})


class SendRules:
    """Who may write where, how often, and what each send answers, for a group of sends at once.

    Each send is answered as if it were alone: (message, created) or its refusal. A retry with the same
    client_id answers the first copy and writes nothing. Every message is written first and the checks
    follow; one refused is deleted again inside the transaction. So the common case costs no look-up for
    retries, and a group costs the same few statements and two Redis round trips whatever its size."""

    def __init__(self, settings: Settings, limiter: RateLimiter, presence: Presence) -> None:
        self.settings = settings
        self.limiter = limiter
        self.presence = presence

    async def write(self, store: SendStore, staged: streams.Staged, sends: list[Send]) -> list[Sent | DomainError]:
        outcomes: list[Sent | DomainError | None] = [None] * len(sends)
        # who may write where: the people of each conversation, in one query
        parties = parties_of(await store.parties(sorted({s.conversation_id for s in sends})))
        firsts: dict[tuple[UUID, UUID, str], int] = {}  # the same send twice in one group: one write
        twins: dict[int, int] = {}
        rows: list[tuple[int, MessageOut]] = []
        now = utcnow()
        for i, send in enumerate(sends):
            party = parties.get(send.conversation_id)
            if party is None or send.author_id not in party.people:
                outcomes[i] = NotVisible("conversation not found")
                continue
            key = (send.conversation_id, send.author_id, send.client_id)
            if key in firsts:
                twins[i] = firsts[key]
                continue
            firsts[key] = i
            rows.append((i, MessageOut(id=uuid7(), conversation_id=send.conversation_id, author_id=send.author_id,
                                       kind="text", text=send.text, document_ids=[str(d.id) for d in send.documents],
                                       client_id=send.client_id, created_at=now, documents=list(send.documents))))
        # write them all; a retry clashes with its first copy and answers that
        created = await store.insert_messages([m for _, m in rows])
        for i, message in rows:
            if message.id not in created:  # a retry (rare: a lost answer)
                outcomes[i] = (await store.first_copy(sends[i]), False)
        # then the checks: closed conversations and rate limits refuse, and what they refuse goes again
        fresh = [(i, m) for i, m in rows if m.id in created]
        open_ = []
        for i, message in fresh:
            if parties[message.conversation_id].window.writable:
                open_.append((i, message))
            else:
                outcomes[i] = Conflict("the conversation is closed for writing", "conversation_closed")
        others = {i: parties[m.conversation_id].people - {m.author_id} for i, m in open_}
        waits, watching = await asyncio.gather(  # two Redis round trips at once, for the whole group
            self.limiter.hit_many([f"chat:send:{m.author_id}" for _, m in open_],
                                  self.settings.chat_sends_per_minute, 60),
            self.presence.foreground(sorted(set().union(*others.values()))))
        accepted = []
        for (i, message), wait in zip(open_, waits, strict=True):
            if wait:
                outcomes[i] = TooMany("too many messages: slow down", wait)
            else:
                accepted.append((i, message))
                outcomes[i] = (message, True)
        refused = [m.id for i, m in fresh if not isinstance(outcomes[i], tuple)]
        if refused:
            await store.delete_messages(refused)
        # analyses the patient's side sent enter the methodists' inbox, in the same transaction as the message
        filed = [(d, m.conversation_id) for i, m in accepted if m.author_id != parties[m.conversation_id].specialist_id
                 for d in sends[i].analyses]
        if filed:
            await store.file_analyses(filed)
        # message.new into each of the people's streams, carrying the message as the REST answer shapes it
        events = [(parties[m.conversation_id].people, "message.new", msgspec.to_builtins(m)) for _, m in accepted]
        # a push (ids only, no text) through the outbox for the others with no socket in the foreground (a phone
        # with the app in the background has a socket open and needs the push); the worker checks again at send time
        await store.write_events(events, [
            (m.id, sorted(str(u) for u in others[i] - watching),
             {"type": "message.new", "ref": str(m.id), "conversation_id": str(m.conversation_id)})
            for i, m in accepted if others[i] - watching], staged)
        for i, first in twins.items():
            outcome = outcomes[first]
            outcomes[i] = (outcome[0], False) if isinstance(outcome, tuple) else outcome
        return [o if o is not None else NotVisible("conversation not found") for o in outcomes]


def window_of(extended_until: dt.datetime | None, planned_end: dt.datetime | None, now: dt.datetime) -> Window:
    """Writable while a consultation holds it open or an extension runs; until: the later of the two ends."""
    extended = extended_until is not None and extended_until > now
    writable = planned_end is not None or extended
    ends = [t for t in (planned_end, extended_until if extended else None) if t is not None]
    return Window(writable, max(ends) if ends else None)
