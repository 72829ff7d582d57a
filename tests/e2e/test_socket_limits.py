"""Socket limits against a real server process: frame size, parse depth, sockets per user, server memory."""

from __future__ import annotations

import asyncio
import contextlib
import json
from pathlib import Path

import pytest
import websockets
from websockets.asyncio.client import ClientConnection

from app.settings import Settings
from tests.conftest import Session
from tests.e2e.conftest import PIDS
from tests.e2e.test_gateway import WAIT, nothing_pending, ws_url

ATTACKERS = 16
HUGE = "x" * (15 * 1024 * 1024)  # one 15 MB text frame per socket
ROUNDS = 2
SLACK_KB = 50 * 1024  # what the server may keep after the attack: far below one round's 16 x 15 MB


@pytest.fixture
def base(api: list[str]) -> str:
    """One of the shared server processes: every socket of a test goes to the same one."""
    return api[0]


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


async def close_code(socket: ClientConnection) -> int | None:
    """The code the server closed this socket with (waiting for its close frame)."""
    with contextlib.suppress(websockets.exceptions.ConnectionClosed):
        while True:
            await asyncio.wait_for(socket.recv(), WAIT)
    return socket.close_code


async def test_huge_frames_are_refused_unread_and_memory_returns(base: str, patient: Session) -> None:
    pid = PIDS[base]
    async with websockets.connect(ws_url(base, patient)) as warm:  # the server has served a socket before
        await nothing_pending(warm)
    baseline = rss_kb(pid)
    for _ in range(ROUNDS):
        sockets = [await websockets.connect(ws_url(base, patient), max_size=None) for _ in range(ATTACKERS)]

        async def attack(socket: ClientConnection) -> int | None:
            with contextlib.suppress(websockets.exceptions.ConnectionClosed):
                await socket.send(HUGE)
            return await close_code(socket)

        codes = await asyncio.gather(*(attack(s) for s in sockets))
        # the newest WS_PER_USER are refused "message too big"; the older ones were closed to make room
        # for them (4409), unless their huge frame reached the server first
        limit = Settings().ws_per_user
        assert codes[-limit:] == [1009] * limit, codes
        assert set(codes) <= {1009, 4409}, codes
    async with websockets.connect(ws_url(base, patient)) as after:  # the server still serves
        await nothing_pending(after)
    grown = rss_kb(pid) - baseline
    assert grown < SLACK_KB, f"the server kept {grown // 1024} MB after the attack"


async def test_a_deeply_nested_frame_is_an_error_and_the_socket_stays(base: str, patient: Session) -> None:
    deep = '{"type":"ping","data":{"a":' + "[" * 4000 + "]" * 4000 + "}}"  # within the frame limit
    assert len(deep) < Settings().ws_max_frame_bytes
    async with websockets.connect(ws_url(base, patient)) as socket:
        await socket.send(deep)
        assert json.loads(await asyncio.wait_for(socket.recv(), WAIT)) == {
            "type": "error", "data": {"reason": "invalid_frame"}}
        assert await nothing_pending(socket) == []  # pong: still open and answering


async def test_a_socket_beyond_the_per_user_limit_closes_the_oldest(base: str, patient: Session) -> None:
    limit = Settings().ws_per_user
    sockets = []
    try:
        for _ in range(limit):
            sockets.append(await websockets.connect(ws_url(base, patient)))
            await nothing_pending(sockets[-1])  # registered before the next one opens
        newest = await websockets.connect(ws_url(base, patient))
        sockets.append(newest)
        assert await close_code(sockets[0]) == 4409
        assert sockets[0].close_reason == "too many sockets"
        for socket in (sockets[1], newest):
            assert await nothing_pending(socket) == []
    finally:
        for socket in sockets:
            await socket.close()
