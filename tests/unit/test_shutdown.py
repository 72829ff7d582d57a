"""A stopping process always ends: a shutdown step that hangs is logged and left, and the steps after it run."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import pytest

from app.main import bounded


@pytest.mark.stalls_a_shutdown_step
async def test_a_hanging_shutdown_step_is_left_and_the_next_one_still_runs(caplog: pytest.LogCaptureFixture) -> None:
    never = asyncio.Event()
    after: list[str] = []

    async def next_step() -> None:
        after.append("ran")

    with caplog.at_level(logging.WARNING, logger="app"):
        await bounded("stuck", waits_forever(never), seconds=0.05)
        await bounded("failing", _fail(), seconds=1)
        await bounded("next", next_step(), seconds=1)
    assert after == ["ran"]
    messages = [(r.getMessage(), getattr(r, "step", None)) for r in caplog.records]
    assert ("a shutdown step did not end in time", "stuck") in messages
    assert ("a shutdown step failed", "failing") in messages
    stuck = next(r for r in caplog.records if getattr(r, "step", None) == "stuck")
    # the log says where every task waits, down to the frame that awaits the event
    assert any("waits_forever > " in t and " events > " in t and "locks.py" in t for t in stuck.tasks), stuck.tasks


async def waits_forever(never: asyncio.Event) -> None:
    async for _ in events(never):  # through an async generator, as a subscription's `listen()` is
        pass


async def events(never: asyncio.Event) -> AsyncIterator[None]:
    await never.wait()
    yield None


async def _fail() -> None:
    raise RuntimeError("refused")
