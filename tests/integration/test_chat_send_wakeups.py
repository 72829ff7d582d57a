"""A chat send wakes the outbox workers only when it staged a push: most sends (every recipient watching
their chat on a socket in the foreground) stage none, and waking the workers for them costs a database pass each."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from litestar.testing import AsyncTestClient
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app import outbox
from app.outbox import OutboxEvent
from tests.conftest import Session
from tests.integration.test_chat import send


@contextmanager
def wake_ups() -> Iterator[list[None]]:
    """Every outbox wake-up while the block runs (a commit that staged rows, or a raw path saying so)."""
    heard: list[None] = []
    undo = outbox.on_commit(lambda: heard.append(None))
    try:
        yield heard
    finally:
        undo()


async def on_app_loop(client: AsyncTestClient[Any], coro: Any) -> Any:
    """Run `coro` on the app's own event loop, where its Redis and database clients live."""
    loop = client.app.state.outbox_worker._loop
    return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, loop))


async def pushes_for(session_maker: async_sessionmaker[AsyncSession], message_id: str) -> int:
    async with session_maker() as session:
        return int(await session.scalar(select(func.count()).select_from(OutboxEvent).where(
            OutboxEvent.aggregate_id == uuid.UUID(message_id))) or 0)


async def test_a_send_to_someone_watching_stages_no_push_and_wakes_no_worker(
    client: AsyncTestClient[Any], specialist: Callable[..., Any], service: Callable[..., Any], patient: Session,
    visit_until: Callable[..., Any], session_maker: async_sessionmaker[AsyncSession],
) -> None:
    doctor = await specialist()
    visit = await visit_until(patient, doctor, await service())
    presence = client.app.state.presence
    await on_app_loop(client, presence.touch(doctor.id, "doctor-socket", True))  # the doctor has the chat open
    try:
        with wake_ups() as heard:
            answer = await send(client, patient, visit["conversation_id"], "are you there?")
        assert answer.status_code == 201
        assert await pushes_for(session_maker, answer.json()["id"]) == 0
        assert heard == []
    finally:
        await on_app_loop(client, presence.leave(doctor.id, "doctor-socket"))


async def test_a_send_to_someone_away_stages_a_push_and_wakes_the_workers(
    client: AsyncTestClient[Any], specialist: Callable[..., Any], service: Callable[..., Any], patient: Session,
    visit_until: Callable[..., Any], session_maker: async_sessionmaker[AsyncSession],
) -> None:
    doctor = await specialist()
    visit = await visit_until(patient, doctor, await service())
    with wake_ups() as heard:
        answer = await send(client, patient, visit["conversation_id"], "when you have a minute")
    assert answer.status_code == 201
    assert await pushes_for(session_maker, answer.json()["id"]) == 1
    assert heard  # before the answer: the push leaves without waiting for the worker's poll
