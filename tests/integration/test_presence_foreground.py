"""Foreground presence (API.md "Push"): a socket is in the foreground from its connect until its client says it
went to the background, and again after it says "foreground"; any instance sees it (through Redis)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest
import uvicorn
import websockets
from litestar.testing import AsyncTestClient
from redis.asyncio import Redis
from websockets.asyncio.client import ClientConnection

from app.chat.hub import Presence, RedisPresence
from app.settings import Settings
from tests.conftest import PROFILE, Session
from tests.e2e.conftest import servers
from tests.e2e.test_gateway import frames_until, nothing_pending, ws_url
from tests.harness import free_port


@asynccontextmanager
async def served(app: Any) -> AsyncIterator[str]:
    """The test client's own (already started) app, served by uvicorn on loopback too: real sockets, and the
    test can ask the app's presence directly (the embedded profile keeps it in the process)."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, lifespan="off", log_level="warning"))
    serving = asyncio.create_task(server.serve())
    while not server.started:  # uvicorn offers no awaitable for it
        if serving.done():
            serving.result()
        await asyncio.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await serving


@pytest.fixture(scope="module")  # server processes take seconds to start: once for the module
async def instances(test_settings: Settings, client: AsyncTestClient[Any]) -> AsyncIterator[tuple[list[str], Presence]]:
    """Base URLs of the API and what any instance (the outbox worker among them) asks about presence: two server
    processes and a presence of our own on their Redis in the real profile; the one embedded process's own."""
    if PROFILE == "real":
        assert test_settings.redis_url
        redis = Redis.from_url(test_settings.redis_url)
        try:
            async with servers(test_settings, 2) as urls:
                yield urls, RedisPresence(redis, test_settings.ws_heartbeat_seconds * 2)
        finally:
            await redis.aclose()
    else:
        async with served(client.app) as url:
            yield [url], client.app.state.presence


async def eventually(check: Callable[[], Awaitable[bool]], what: str) -> None:
    """For what a socket's closing does on the server: the client hears of no moment when it is done."""
    for _ in range(500):
        if await check():
            return
        await asyncio.sleep(0.02)
    raise AssertionError(what)


async def say(socket: ClientConnection, state: Any) -> list[dict[str, Any]]:
    """Send a presence frame; once the pong behind it arrives, the server has handled it."""
    await socket.send(json.dumps({"type": "presence", "data": {"state": state}}))
    return await nothing_pending(socket)


async def test_a_socket_is_in_the_foreground_until_its_client_says_otherwise(
        instances: tuple[list[str], Presence], patient: Session, login: Any, new_phone: Any) -> None:
    urls, presence = instances
    other: Session = await login(new_phone())
    async with websockets.connect(ws_url(urls[0], patient)) as socket, \
            websockets.connect(ws_url(urls[-1], other)) as elsewhere:
        await nothing_pending(socket)
        await nothing_pending(elsewhere)
        assert await presence.foreground([patient.id, other.id]) == {patient.id, other.id}  # from its connect

        assert await say(socket, "background") == []
        assert await presence.foreground([patient.id, other.id]) == {other.id}
        assert await presence.online([patient.id]) == {patient.id}  # still connected: events still reach it

        await nothing_pending(socket)  # a heartbeat keeps it alive, and in the background
        assert await presence.foreground([patient.id]) == set()

        assert await say(socket, "foreground") == []
        assert await presence.foreground([patient.id]) == {patient.id}

    async def gone() -> bool:
        return await presence.foreground([patient.id, other.id]) == set()

    await eventually(gone, "closed sockets still count as in the foreground")


async def test_a_bad_presence_frame_is_answered_and_changes_nothing(
        instances: tuple[list[str], Presence], patient: Session) -> None:
    urls, presence = instances
    async with websockets.connect(ws_url(urls[0], patient)) as socket:
        await nothing_pending(socket)
        for bad in ("asleep", None, 1, ["background"]):
            answered = await say(socket, bad)
            assert answered == [{"type": "error", "data": {"reason": "invalid_presence_state"}}]
        await socket.send(json.dumps({"type": "presence"}))
        assert (await frames_until(socket, lambda f: f["type"] == "error"))[-1]["data"]["reason"] == \
            "invalid_presence_state"
        assert await presence.foreground([patient.id]) == {patient.id}


async def test_a_user_is_in_the_foreground_while_any_of_their_sockets_is_on_any_instance(
        instances: tuple[list[str], Presence], patient: Session) -> None:
    urls, presence = instances
    async with websockets.connect(ws_url(urls[0], patient)) as phone:
        async with websockets.connect(ws_url(urls[-1], patient)) as browser:
            await nothing_pending(phone)
            await nothing_pending(browser)

            await say(phone, "background")
            assert await presence.foreground([patient.id]) == {patient.id}  # the browser tab is still shown
            await say(browser, "background")
            assert await presence.foreground([patient.id]) == set()
            await say(phone, "foreground")
            assert await presence.foreground([patient.id]) == {patient.id}
            await say(phone, "background")
            await say(browser, "foreground")
        # the shown tab closed; the phone is still connected, in the background

        async def background_only() -> bool:
            return await presence.foreground([patient.id]) == set()

        await eventually(background_only, "a closed socket still counts as in the foreground")
        await nothing_pending(phone)
        assert await presence.online([patient.id]) == {patient.id}
