"""A background task that swallows a cancellation (as a client's reconnect loop does when the cancel comes out
as a timeout) still stops when the app stops it."""

from __future__ import annotations

import asyncio

from app.tasks import cancel_until_done


async def test_a_task_that_swallows_one_cancellation_still_ends() -> None:
    swallowed = asyncio.Event()

    async def reconnecting_listener() -> None:
        while True:
            try:
                await asyncio.Event().wait()  # a subscription's read
            except asyncio.CancelledError:
                if swallowed.is_set():
                    raise
                swallowed.set()  # taken for a lost connection: reconnect

    task = asyncio.create_task(reconnecting_listener())
    await asyncio.sleep(0)
    await asyncio.wait_for(cancel_until_done(task, every=0.01), 5)
    assert swallowed.is_set()
    assert task.cancelled()


async def test_what_the_task_raised_is_retrieved_not_raised() -> None:
    async def failing_on_cancel() -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            raise RuntimeError("cleanup failed") from None

    task = asyncio.create_task(failing_on_cancel())
    await asyncio.sleep(0)
    await cancel_until_done(task)
    assert isinstance(task.exception(), RuntimeError)
