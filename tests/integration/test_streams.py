"""Event streams: numbered per user, gaps filled from the database, slow sockets let go."""

from __future__ import annotations

import asyncio
import json
import uuid

from prometheus_client import REGISTRY

from app.chat import streams
from app.chat.gateway import Resume, forward
from app.chat.hub import Connection, Hub
from app.db import Database
from app.settings import Settings


class RecordingSocket:
    def __init__(self) -> None:
        self.sent: list[str] = []

    async def send_text(self, text: str) -> None:
        self.sent.append(text)


async def written(database: Database, recipients: set[uuid.UUID], count: int) -> list[streams.Event]:
    async with database.writer() as session:
        staged = streams.staged_for(session)
        for i in range(count):
            await streams.append(session, staged, recipients, "notice", {"n": i})
        await session.commit()
    return staged.events


async def test_each_user_has_their_own_numbering(test_settings: Settings) -> None:
    database = Database(test_settings)
    a, b = uuid.uuid4(), uuid.uuid4()
    events = await written(database, {a, b}, 3)
    assert sorted((e.recipient_id == a, e.seq) for e in events) == sorted(
        [(True, 1), (True, 2), (True, 3), (False, 1), (False, 2), (False, 3)])
    async with database.reader() as session:
        assert [e.data["n"] for e in await streams.after(session, a, 1)] == [1, 2]
        assert await streams.last_seq(session, b) == 3
    await database.dispose()


async def sent_ids(socket: RecordingSocket, count: int) -> list[str | None]:
    async with asyncio.timeout(10):
        while len(socket.sent) < count:
            await asyncio.sleep(0.01)
    await asyncio.sleep(0.05)  # anything extra would show up now
    return [json.loads(frame).get("id") for frame in socket.sent]


async def test_a_gap_is_filled_from_the_database_and_duplicates_dropped(test_settings: Settings) -> None:
    database = Database(test_settings)
    user = uuid.uuid4()
    events = await written(database, {user}, 4)
    connection, socket = Connection(user, 100), RecordingSocket()
    connection.ready.set()  # a fresh socket that does not resume
    sender = asyncio.create_task(forward(socket, connection, database))  # type: ignore[arg-type]
    connection.offer(events[2])  # 1 and 2 were never published here (a lost publish)
    connection.offer(events[0])  # a late duplicate
    connection.offer(events[3])
    connection.offer('{"type":"pong"}')
    assert await sent_ids(socket, 5) == ["1", "2", "3", "4", None]
    sender.cancel()
    await database.dispose()


async def test_a_first_frame_resume_is_replayed_before_live_events(test_settings: Settings) -> None:
    database = Database(test_settings)
    user = uuid.uuid4()
    events = await written(database, {user}, 4)
    connection, socket = Connection(user, 100), RecordingSocket()
    connection.last_seq = connection.started_at = 4  # the socket opened after four events
    sender = asyncio.create_task(forward(socket, connection, database))  # type: ignore[arg-type]
    connection.offer(events[3])  # a live event that raced the client's resume
    connection.resume_from = 1
    connection.ready.set()
    more = await written(database, {user}, 1)
    connection.offer(more[0])
    assert await sent_ids(socket, 4) == ["2", "3", "4", "5"]
    sender.cancel()
    await database.dispose()


async def test_a_late_resume_sends_only_what_the_socket_never_had(test_settings: Settings) -> None:
    database = Database(test_settings)
    user = uuid.uuid4()
    events = await written(database, {user}, 4)
    connection, socket = Connection(user, 100), RecordingSocket()
    connection.last_seq = connection.started_at = 2
    connection.ready.set()
    sender = asyncio.create_task(forward(socket, connection, database))  # type: ignore[arg-type]
    sent_before = REGISTRY.get_sample_value("clinic_websocket_events_sent_total") or 0
    resumes_before = REGISTRY.get_sample_value("clinic_websocket_resumes_total") or 0
    connection.offer(events[2])
    connection.offer(events[3])
    assert await sent_ids(socket, 2) == ["3", "4"]
    connection.offer(Resume(0))
    assert await sent_ids(socket, 4) == ["3", "4", "1", "2"]  # once each; the older ones necessarily later
    assert REGISTRY.get_sample_value("clinic_websocket_events_sent_total") == sent_before + 4
    assert REGISTRY.get_sample_value("clinic_websocket_resumes_total") == resumes_before + 1
    sender.cancel()
    await database.dispose()


def test_a_client_that_does_not_read_is_let_go() -> None:
    hub, connection = Hub(), Connection(uuid.uuid4(), limit=2)
    hub.add(connection)
    staged = streams.Staged()
    staged.events = [streams.Event(connection.user_id, n, "notice", {}) for n in range(1, 4)]
    hub.deliver(staged.encode())
    assert connection.overflowed.is_set()
    assert connection.queue.qsize() == 2
    hub.remove(connection)
    assert hub.count == 0
