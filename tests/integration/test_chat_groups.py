"""Sends written as one group (app/chat/sending.py): each answered as if alone, the streams kept whole."""

from __future__ import annotations

import asyncio
import socket
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import msgspec
import pytest
from litestar.testing import AsyncTestClient
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.chat import streams
from app.chat.hub import InProcessBus, InProcessPresence
from app.chat.models import Message, UserEvent, UserStream
from app.chat.sending import SendQueue
from app.chat.service import SendRules
from app.chat.store import Send, SqlSendStore, open_store
from app.db import Database
from app.errors import Conflict, NotVisible, TooMany, Unavailable
from app.limits import InProcessLimiter
from app.settings import Settings
from tests.conftest import POSTGRES, Session, refused, running
from tests.integration.test_chat import send


@pytest.fixture
async def open_chat(specialist: Callable[..., Any], service: Callable[..., Any], patient: Session,
                    visit_until: Callable[..., Any]) -> tuple[Session, dict[str, Any]]:
    """A doctor and a confirmed visit of the patient's with them: their chat takes messages."""
    doctor = await specialist()
    return doctor, await visit_until(patient, doctor, await service())


async def stream_of(session_maker: async_sessionmaker[AsyncSession], user: Session) -> list[tuple[int, str, Any]]:
    async with session_maker() as session:
        rows = await session.execute(select(UserEvent.seq, UserEvent.type, UserEvent.data)
                                     .where(UserEvent.recipient_id == user.id).order_by(UserEvent.seq))
        return [(r.seq, r.type, r.data) for r in rows]


@pytest.mark.parametrize("route", ["sqlalchemy", "queue"])
async def test_one_group_answers_each_send_on_its_own(
    route: str, client: AsyncTestClient[Any], test_settings: Settings, specialist: Callable[..., Any],
    service: Callable[..., Any], patient: Session,
        login: Callable[[str], Any], new_phone: Callable[[], str], session_maker: async_sessionmaker[AsyncSession],
    visit_until: Callable[..., Any],
) -> None:
    doctor, visit_type, other_doctor = await specialist(), await service(), await specialist()
    visit = await visit_until(patient, doctor, visit_type)
    closed = await visit_until(patient, other_doctor, visit_type, "completed", nth=1)  # one place at a time
    stranger = await login(new_phone())
    open_id, closed_id = uuid.UUID(visit["conversation_id"]), uuid.UUID(closed["conversation_id"])
    earlier = (await send(client, patient, visit["conversation_id"], "sent before", client_id="earlier")).json()
    before = {who.id: await stream_of(session_maker, who) for who in (patient, doctor)}

    group = [
        Send(patient.id, open_id, "first", "p-1"),
        Send(patient.id, open_id, "first", "p-1"),  # the same send twice in one group
        Send(doctor.id, open_id, "a reply", "d-1"),
        Send(stranger.id, open_id, "let me in", "s-1"),
        Send(patient.id, closed_id, "too late", "p-2"),
        Send(patient.id, open_id, "sent before", "earlier"),  # a retry of a committed send
        Send(patient.id, open_id, "second", "p-3"),
        Send(patient.id, open_id, "third", "p-4"),  # over a limit of two a minute
    ]
    # the app's Redis client belongs to the app's loop: this group counts and looks in-process
    strict = msgspec.structs.replace(test_settings, chat_sends_per_minute=2)
    rules = SendRules(strict, InProcessLimiter(), InProcessPresence(60))
    if route == "sqlalchemy":  # the SQLAlchemy store, on any database
        async with session_maker() as session:
            outcomes = await rules.write(SqlSendStore(session), streams.Staged(), group)
            await session.commit()
    else:  # as the send queue writes: asyncpg itself on PostgreSQL
        database = Database(test_settings)
        try:
            async with open_store(database) as store:
                outcomes = await rules.write(store, streams.Staged(), group)
        finally:
            await database.dispose()

    assert [(o[0].text, o[1]) if isinstance(o, tuple) else type(o) for o in outcomes] == [
        ("first", True), ("first", False), ("a reply", True), NotVisible, Conflict, ("sent before", False),
        ("second", True), TooMany]
    first, twin, _, _, late, retry, _, third = outcomes
    assert isinstance(first, tuple)
    assert isinstance(twin, tuple)
    assert twin[0] == first[0]  # the same message, not a second one
    assert isinstance(late, Conflict)
    assert late.extra["reason"] == "conversation_closed"
    assert isinstance(retry, tuple)
    assert str(retry[0].id) == earlier["id"]
    assert isinstance(third, TooMany)
    assert third.extra["retry_after"] > 0

    async with session_maker() as session:
        written = (await session.scalars(select(Message.text).where(Message.conversation_id.in_([open_id, closed_id]))
                                         .order_by(Message.id))).all()
    assert written == ["sent before", "first", "a reply", "second"]  # nothing refused stays written
    for who in (patient, doctor):
        events = (await stream_of(session_maker, who))[len(before[who.id]):]
        last = before[who.id][-1][0] if before[who.id] else 0
        assert [seq for seq, _, _ in events] == list(range(last + 1, last + 4))  # no gap, nothing twice
        assert [data["text"] for _, _, data in events] == ["first", "a reply", "second"]
        assert all(type_ == "message.new" for _, type_, _ in events)


class RecordingBus(InProcessBus):
    def __init__(self) -> None:
        super().__init__()
        self.published: list[list[streams.Event]] = []

    async def publish(self, raw: bytes) -> None:
        self.published.append(streams.decode(raw))


def queue_for(settings: Settings, bus: InProcessBus, timeout: float = 5.0) -> SendQueue:
    """A send queue on this test's loop (the app's own runs on the app's loop)."""
    return SendQueue(Database(settings), SendRules(settings, InProcessLimiter(), InProcessPresence(60)), bus,
                     timeout=timeout)


@asynccontextmanager
async def writing(queue: SendQueue) -> AsyncIterator[SendQueue]:
    """The queue with its writer running, stopped and its database closed afterwards."""
    writer = asyncio.create_task(queue.run())
    await asyncio.sleep(0)
    try:
        yield queue
    finally:
        writer.cancel()
        await queue.database.dispose()


async def test_concurrent_sends_share_groups_and_land_in_order_on_both_streams(
    open_chat: tuple[Session, dict[str, Any]], patient: Session, session_maker: async_sessionmaker[AsyncSession],
    test_settings: Settings,
) -> None:
    doctor, visit = open_chat
    conversation_id = uuid.UUID(visit["conversation_id"])
    before = len(await stream_of(session_maker, doctor))
    bus = RecordingBus()
    async with writing(queue_for(test_settings, bus)) as queue:
        answers = await asyncio.gather(*(queue.send(Send((patient if i % 2 else doctor).id, conversation_id,
                                                         f"m{i}", f"c{i}")) for i in range(40)))
    assert [created for _, created in answers] == [True] * 40
    assert len(bus.published) < 40  # they shared groups
    assert sum(len(p) for p in bus.published) == 80  # each message to both sides, once
    events = (await stream_of(session_maker, doctor))[before:]
    assert [seq for seq, _, _ in events] == list(range(events[0][0], events[0][0] + 40))
    assert {data["id"] for _, _, data in events} == {str(m.id) for m, _ in answers}
    message_order = [data["id"] for _, _, data in events]
    assert message_order == sorted(message_order)  # streams hear messages in the order they were written


async def test_sends_waiting_when_the_queue_stops_are_told_to_retry(
    test_settings: Settings, patient: Session,
) -> None:
    queue = queue_for(test_settings, RecordingBus())
    with pytest.raises(Unavailable):  # not running yet
        await queue.send(Send(patient.id, uuid.uuid4(), "early", "e-1"))
    writer = asyncio.create_task(queue.run())
    await asyncio.sleep(0)
    waiting = [asyncio.create_task(queue.send(Send(patient.id, uuid.uuid4(), "late", f"l-{i}"))) for i in range(3)]
    await asyncio.sleep(0)
    writer.cancel()
    outcomes = await asyncio.gather(*waiting, return_exceptions=True)
    await queue.database.dispose()
    assert [type(o) for o in outcomes] == [Unavailable] * 3
    assert all(isinstance(o, Unavailable) and o.extra["reason"] == "chat_unavailable" for o in outcomes)


@pytest.mark.skipif(not POSTGRES, reason="asyncpg's statement timeout: PostgreSQL only")
async def test_a_group_stuck_behind_a_lock_is_refused_and_the_retry_lands(
    open_chat: tuple[Session, dict[str, Any]], patient: Session, session_maker: async_sessionmaker[AsyncSession],
    test_settings: Settings,
) -> None:
    doctor, visit = open_chat
    conversation_id = uuid.UUID(visit["conversation_id"])
    send_ = Send(patient.id, conversation_id, "are you there?", "stuck-1")
    async with writing(queue_for(test_settings, RecordingBus(), timeout=0.5)) as queue:
        async with session_maker() as holder:  # another transaction holds the doctor's stream row
            await holder.execute(select(UserStream).where(UserStream.user_id == doctor.id).with_for_update())
            with pytest.raises(Unavailable) as refused_:
                await queue.send(send_)
            await holder.rollback()
        assert refused_.value.extra["reason"] == "chat_unavailable"
        async with session_maker() as session:
            assert await session.scalar(select(Message.id).where(Message.client_id == "stuck-1")) is None
        message, created = await queue.send(send_)  # the client's retry: written now, once
        assert created
        assert message.text == "are you there?"
        assert (await queue.send(send_)) == (message, False)


async def test_a_send_answers_503_when_redis_stops_answering(
    open_chat: tuple[Session, dict[str, Any]], patient: Session, test_settings: Settings,
) -> None:
    _, visit = open_chat
    silent = socket.socket()  # takes connections (the kernel's backlog) and never says a word
    silent.bind(("127.0.0.1", 0))
    silent.listen(64)
    port = silent.getsockname()[1]
    stalled = msgspec.structs.replace(test_settings, redis_url=f"redis://127.0.0.1:{port}/0", redis_timeout_seconds=0.3)
    try:
        async with running(stalled) as client:
            started = time.monotonic()
            answer = await send(client, patient, visit["conversation_id"], "is anyone there?", client_id="silent-1")
            waited = time.monotonic() - started
    finally:
        silent.close()
    refused(answer, 503, "chat_unavailable")
    assert waited < 5  # the send was refused, not left hanging
