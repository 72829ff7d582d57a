"""Event streams: numbered per user, gaps filled from the database, slow sockets let go."""

from __future__ import annotations

import asyncio
import json
import uuid

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


async def test_a_gap_is_filled_from_the_database_and_duplicates_dropped(test_settings: Settings) -> None:
    database = Database(test_settings)
    user = uuid.uuid4()
    events = await written(database, {user}, 4)
    connection, socket = Connection(user, 100), RecordingSocket()
    sender = asyncio.create_task(forward(socket, connection, database))  # type: ignore[arg-type]
    connection.offer(events[2])  # 1 and 2 were never published here (a lost publish)
    connection.offer(events[0])  # late duplicate
    connection.offer(events[3])
    connection.offer(Resume(0))  # the client asks again from the start
    connection.offer('{"type":"pong"}')
    while len(socket.sent) < 9:
        await asyncio.sleep(0.01)
    sender.cancel()
    ids = [json.loads(frame).get("id") for frame in socket.sent]
    assert ids == ["1", "2", "3", "4", "1", "2", "3", "4", None]
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
