"""The realtime socket: GET /api/v1/ws?token=... carries every server event to one client session.

Each socket registers with the process's hub before it reads where its stream stands, so no event falls
between the two. Its sender task forwards events in stream order: an older one is a duplicate and dropped;
a newer one after a gap first has the gap filled from the database. A client that does not read fast
enough fills its queue and is disconnected; it resumes where it left off when it comes back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from typing import Any

import msgspec
from litestar import WebSocket, websocket
from litestar.datastructures import State
from litestar.exceptions import WebSocketDisconnect

from app.access import signed_in
from app.chat import streams
from app.chat.hub import Connection
from app.db import Database
from app.observability import OPEN_WEBSOCKETS

log = logging.getLogger("app.realtime")
PONG = '{"type":"pong"}'
CLOSE_IDLE, CLOSE_SLOW = 4408, 4429
FIRST_FRAME_GRACE = 0.3  # seconds live events wait for a resuming client's first frame


def error_frame(reason: str) -> str:
    return msgspec.json.encode({"type": "error", "data": {"reason": reason}}).decode()


@dataclass(frozen=True, slots=True)
class Resume:
    after: int


class ClientFrame(msgspec.Struct):
    type: str
    data: dict[str, Any] = msgspec.field(default_factory=dict)


def frame(event: streams.Event) -> str:
    return msgspec.json.encode({"type": event.type, "id": str(event.seq), "data": event.data}).decode()


async def forward(socket: WebSocket[Any, Any, Any], connection: Connection, database: Database) -> None:
    """Send the socket its events in stream order, each once; the only task that writes to the socket."""

    async def fill(after: int, up_to: int | None) -> int:
        """Send the stored events in (after, up_to]; returns the last position sent."""
        while True:
            async with database.reader() as session:
                missing = await streams.after(session, connection.user_id, after, up_to)
            for event in missing:
                await socket.send_text(frame(event))
                after = event.seq
            if len(missing) < streams.PAGE:
                return after

    # A resuming client says so in its first frame: live events wait for it (briefly), so that the replay
    # comes first and everything arrives in order.
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(connection.ready.wait(), FIRST_FRAME_GRACE)
    if connection.resume_from is not None:
        connection.last_seq = await fill(min(connection.resume_from, connection.last_seq), None)
    while True:
        item = await connection.queue.get()
        if isinstance(item, str):
            await socket.send_text(item)
        elif isinstance(item, Resume):  # a late resume: send only what this socket never had, once
            if item.after < connection.started_at:
                await fill(item.after, connection.started_at)
        elif item.seq > connection.last_seq:
            if item.seq > connection.last_seq + 1:  # published out of order, or a publish was lost: fetch it
                connection.last_seq = await fill(connection.last_seq, item.seq - 1)
            await socket.send_text(frame(item))
            connection.last_seq = item.seq


@websocket("/api/v1/ws", guards=[signed_in])
async def realtime(socket: WebSocket[Any, Any, Any], state: State) -> None:
    settings, database = state.settings, state.database
    await socket.accept()
    connection = Connection(socket.user.id, settings.ws_queue_limit)
    state.hub.add(connection)  # first listen, then look where the stream stands
    OPEN_WEBSOCKETS.inc()
    sender: asyncio.Task[None] | None = None
    try:
        async with database.reader() as session:
            connection.last_seq = connection.started_at = await streams.last_seq(session, connection.user_id)
        await touch(state, connection)
        sender = asyncio.create_task(forward(socket, connection, database))
        await serve(socket, connection, state, sender)
    except WebSocketDisconnect:
        pass  # the client left
    except Exception:
        log.exception("socket failed", extra={"user_id": str(connection.user_id)})
        raise
    finally:
        state.hub.remove(connection)
        OPEN_WEBSOCKETS.dec()
        await state.presence.leave(connection.user_id, connection.id)
        if sender is not None:
            sender.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await sender


async def serve(socket: WebSocket[Any, Any, Any], connection: Connection, state: State,
                sender: asyncio.Task[None]) -> None:
    """Read the client's frames until it leaves, falls silent, is too slow, or the sender fails."""
    heartbeat = state.settings.ws_heartbeat_seconds
    while True:
        receive = asyncio.ensure_future(socket.receive_text())
        slow = asyncio.ensure_future(connection.overflowed.wait())
        done, _ = await asyncio.wait({receive, slow, sender}, timeout=heartbeat,
                                     return_when=asyncio.FIRST_COMPLETED)
        slow.cancel()
        if receive not in done:
            receive.cancel()
            with contextlib.suppress(asyncio.CancelledError, WebSocketDisconnect):
                await receive
            code, reason = (CLOSE_SLOW, "too slow") if slow in done else (CLOSE_IDLE, "no heartbeat")
            if sender in done:
                return  # the socket is gone under the sender
            with contextlib.suppress(Exception):
                await socket.close(code=code, reason=reason)
            return
        try:
            text = receive.result()
        except WebSocketDisconnect:
            return
        try:
            message = msgspec.json.decode(text, type=ClientFrame)
        except msgspec.DecodeError:
            connection.offer(error_frame("invalid_frame"))
            continue
        if message.type == "ping":
            await touch(state, connection)
            connection.offer(PONG)
        elif message.type == "resume":
            try:
                after = max(0, int(str(message.data.get("last_event_id"))))
            except ValueError:
                connection.offer(error_frame("invalid_event_id"))
            else:
                if connection.ready.is_set():
                    connection.offer(Resume(after))
                else:
                    connection.resume_from = after
        else:  # rtc.offer and rtc.candidate arrive with calls
            connection.offer(error_frame("unsupported_type"))
        connection.ready.set()


async def touch(state: State, connection: Connection) -> None:
    """Renew presence; a Redis hiccup must not cost the client its socket."""
    try:
        await state.presence.touch(connection.user_id, connection.id)
    except Exception:
        log.warning("presence not renewed", exc_info=True)
