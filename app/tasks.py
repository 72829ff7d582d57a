"""Stopping background tasks so that they really stop."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

RECANCEL_SECONDS = 1.0


async def cancel_until_done(task: asyncio.Future[Any], every: float = RECANCEL_SECONDS) -> None:
    """Cancel `task` and wait for it to end, cancelling it again while it still runs.

    One cancel() does not always end a task: a cancellation that lands as a timeout expires can come out as
    TimeoutError (asyncio.timeout in Python 3.11), and a client's retry loop, or our own reconnecting loops,
    then go on as if nothing happened. A task left running past a shutdown holds its connection and waits
    forever on a closed pool. What the task raised is not this function's business (it is not re-raised).
    """
    while not task.done():
        task.cancel()
        await asyncio.wait({task}, timeout=every)
    if not task.cancelled():
        task.exception()  # retrieved: no "exception was never retrieved" at garbage collection


def set_event_from_any_thread(loop: asyncio.AbstractEventLoop | None, event: asyncio.Event) -> None:
    """Set `event`, which belongs to `loop`, from that loop or any other thread (a commit on another event loop, as
    in tests). Nothing happens before the loop is known or after it has closed."""
    if loop is None:
        return
    try:
        running: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
    except RuntimeError:
        running = None
    if running is loop:
        event.set()
    else:
        with contextlib.suppress(RuntimeError):  # that loop has closed: nobody to wake
            loop.call_soon_threadsafe(event.set)
