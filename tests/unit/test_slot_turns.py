"""One process's bookers of one slot take turns: behind a booking that took the slot, 409 without trying."""

from __future__ import annotations

import asyncio
from uuid import uuid4

import pytest

from app.consultations.booking import SlotTurns
from app.errors import Conflict


async def test_those_behind_a_booker_that_took_the_slot_are_refused_without_trying() -> None:
    turns, slot, tried = SlotTurns(), uuid4(), []
    release = asyncio.Event()

    async def book(name: str, succeeds: bool) -> str:
        try:
            async with turns.turn(slot):
                tried.append(name)
                await release.wait()
                if not succeeds:
                    raise RuntimeError("refused")
        except Conflict as refusal:
            return str(refusal.extra["reason"])
        except RuntimeError:
            return "failed"
        return "booked"

    first = asyncio.create_task(book("first", succeeds=False))
    await asyncio.sleep(0)
    second = asyncio.create_task(book("second", succeeds=True))
    third = asyncio.create_task(book("third", succeeds=True))
    await asyncio.sleep(0.01)
    assert tried == ["first"]  # the others wait for it
    release.set()
    assert await asyncio.gather(first, second, third) == ["failed", "booked", "slot_taken"]
    assert tried == ["first", "second"]  # the first failed, so the second tried; the third never did


async def test_bookers_of_other_slots_do_not_wait() -> None:
    turns, hold = SlotTurns(), asyncio.Event()

    async def holding() -> None:
        async with turns.turn(uuid4()):
            await hold.wait()

    waiting = asyncio.create_task(holding())
    await asyncio.sleep(0)
    async with asyncio.timeout(5):
        async with turns.turn(uuid4()):
            pass
    hold.set()
    await waiting


async def test_a_booker_that_gives_up_frees_its_turn() -> None:
    turns, slot = SlotTurns(), uuid4()

    async def stuck() -> None:
        async with turns.turn(slot):
            await asyncio.sleep(60)

    task = asyncio.create_task(stuck())
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    async with asyncio.timeout(5):
        async with turns.turn(slot):
            pass
