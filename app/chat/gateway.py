"""The realtime socket: GET /api/v1/ws carries every server event to one client session.

A client authenticates the socket with a single-use ticket (`POST /api/v1/ws/ticket`, then `?ticket=`), with
its access token as the subprotocol pair `bearer, <token>`, or with `?token=` (kept for old clients; logs
redact it). A user holds at most WS_PER_USER sockets per process: a newer one closes the oldest (4409). A
client message is small (a WebRTC offer, the largest, is a few KB): one beyond WS_MAX_FRAME_BYTES closes the
socket with 1009 before the server buffers it, and a frame nested too deep is an error frame, not a crash.

Each socket registers with the process's hub before it reads where its stream stands, so no event falls
between the two. Its sender task forwards events in stream order: an older one is a duplicate and dropped;
a newer one after a gap first has the gap filled from the database. A client that does not read fast
enough fills its queue and is disconnected; it resumes where it left off when it comes back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

import msgspec
from litestar import Request, WebSocket, post, websocket
from litestar.datastructures import State
from litestar.exceptions import WebSocketDisconnect

from app.chat import streams
from app.chat.hub import Connection
from app.db import Database
from app.observability import OPEN_WEBSOCKETS, SOCKET_EVENTS, SOCKET_RESUMES, SOCKETS_CLOSED

log = logging.getLogger("app.realtime")
PONG = '{"type":"pong"}'
CLOSE_IDLE, CLOSE_SLOW = 4408, 4429
CLOSE_TOO_BIG, CLOSE_CROWDED = 1009, 4409  # 1009: RFC 6455 "message too big"
FIRST_FRAME_GRACE = 0.3  # seconds live events wait for a resuming client's first frame
PRESENCE_STATES = ("foreground", "background")


def error_frame(reason: str) -> str:
    return msgspec.json.encode({"type": "error", "data": {"reason": reason}}).decode()


@dataclass(frozen=True, slots=True)
class Resume:
    after: int


@dataclass(frozen=True, slots=True)
class SocketRoute:  # INTERFACE: what `state.socket_handlers` maps a client message type to
    """A message type handled outside the gateway (rtc.offer, rtc.candidate): `handler(state, viewer, data)` → a
    frame for this socket or None. `busy_reason`: while one such message waits or is handled, another is refused
    with an error frame of this reason (an offer in flight)."""

    handler: Callable[[State, Any, dict[str, Any]], Awaitable[str | None]]
    busy_reason: str | None = None


LANE_LIMIT = 32  # handled messages waiting on one socket (a trickle is a dozen candidates)


@dataclass(slots=True)
class Lane:
    """The socket's handled messages, one at a time and in order (a candidate after its offer), in a task of their
    own: the read loop goes on answering pings and noticing a kick while an offer waits on the SFU."""

    queue: asyncio.Queue[tuple[SocketRoute, dict[str, Any]]] = field(
        default_factory=lambda: asyncio.Queue(LANE_LIMIT))
    busy: dict[str, int] = field(default_factory=dict)  # busy_reason → messages of it waiting or in hand
    task: asyncio.Task[None] | None = None

    def take(self, route: SocketRoute, data: dict[str, Any],
             run: Callable[[], Coroutine[Any, Any, None]]) -> str | None:
        """Queue the message; the reason it is refused, if it is."""
        if route.busy_reason is not None and self.busy.get(route.busy_reason):
            return route.busy_reason
        if self.queue.full():
            return "too_many_messages"
        if route.busy_reason is not None:
            self.busy[route.busy_reason] = self.busy.get(route.busy_reason, 0) + 1
        self.queue.put_nowait((route, data))
        if self.task is None:
            self.task = asyncio.create_task(run())
        return None

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self.task


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
            SOCKET_EVENTS.inc(len(missing))
            if len(missing) < streams.PAGE:
                return after

    # A resuming client says so in its first frame: live events wait for it (briefly), so that the replay
    # comes first and everything arrives in order.
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(connection.ready.wait(), FIRST_FRAME_GRACE)
    if connection.resume_from is not None:
        SOCKET_RESUMES.inc()
        connection.last_seq = await fill(min(connection.resume_from, connection.last_seq), None)
    while True:
        item = await connection.queue.get()
        if isinstance(item, str):
            await socket.send_text(item)
            SOCKET_EVENTS.inc()
        elif isinstance(item, Resume):  # a late resume: send only what this socket never had, once
            SOCKET_RESUMES.inc()
            if item.after < connection.started_at:
                await fill(item.after, connection.started_at)
        elif item.seq > connection.last_seq:
            if item.seq > connection.last_seq + 1:  # published out of order, or a publish was lost: fetch it
                connection.last_seq = await fill(connection.last_seq, item.seq - 1)
            await socket.send_text(frame(item))
            SOCKET_EVENTS.inc()
            connection.last_seq = item.seq


class SocketTicket(msgspec.Struct):
    ticket: str
    expires_in: int  # seconds


@post("/api/v1/ws/ticket", status_code=201)
async def socket_ticket(request: Request[Any, Any, Any], state: State) -> SocketTicket:
    """A single-use ticket for opening the socket (`/api/v1/ws?ticket=`), so no token travels in a URL."""
    ticket = await state.tickets.issue(request.auth)
    return SocketTicket(ticket, max(1, round(state.settings.ws_ticket_seconds)))


@websocket("/api/v1/ws")
async def realtime(socket: WebSocket[Any, Any, Any], state: State) -> None:
    settings, database = state.settings, state.database
    # a browser client that sent its token as the subprotocol pair `bearer, <token>` needs `bearer` chosen
    offered = [str(p).strip().lower() for p in socket.scope.get("subprotocols") or ()]
    await socket.accept(subprotocols="bearer" if "bearer" in offered else None)
    connection = Connection(socket.user.id, settings.ws_queue_limit, socket.user.sid)
    state.hub.add(connection)  # first listen, then look where the stream stands
    for older in state.hub.oldest_beyond(connection.user_id, settings.ws_per_user):
        older.kick(CLOSE_CROWDED, "too many sockets")
    OPEN_WEBSOCKETS.inc()
    sender: asyncio.Task[None] | None = None
    lane = Lane()
    try:
        async with database.reader() as session:
            connection.last_seq = connection.started_at = await streams.last_seq(session, connection.user_id)
        await touch(state, connection)
        sender = asyncio.create_task(forward(socket, connection, database))
        await serve(socket, connection, state, sender, lane)
    except WebSocketDisconnect:
        pass  # the client left
    except Exception:
        log.exception("socket failed", extra={"user_id": str(connection.user_id)})
        raise
    finally:
        state.hub.remove(connection)
        OPEN_WEBSOCKETS.dec()
        await state.presence.leave(connection.user_id, connection.id)
        await lane.stop()
        if sender is not None:
            sender.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await sender


async def handle(lane: Lane, state: State, user: Any, connection: Connection) -> None:
    """The lane's task: its messages one by one, each reply onto the socket's queue."""
    while True:
        route, data = await lane.queue.get()
        try:
            reply = await route.handler(state, user, data)
        except Exception:  # a handler answers its own refusals; anything else must not end the lane
            log.exception("a socket message failed", extra={"user_id": str(connection.user_id)})
            reply = error_frame("internal_error")
        finally:
            if route.busy_reason is not None:
                lane.busy[route.busy_reason] -= 1
        if reply is not None:
            connection.offer(reply)


def refusal_frame(reason: str, data: dict[str, Any]) -> str:
    call_id = data.get("call_id")
    return msgspec.json.encode({"type": "error", "data": {
        "reason": reason, "call_id": call_id if isinstance(call_id, str) else None}}).decode()


async def serve(socket: WebSocket[Any, Any, Any], connection: Connection, state: State,
                sender: asyncio.Task[None], lane: Lane | None = None) -> None:
    """Read the client's frames until it leaves, falls silent, is too slow, or the sender fails."""
    heartbeat, largest = state.settings.ws_heartbeat_seconds, state.settings.ws_max_frame_bytes
    lane = lane if lane is not None else Lane()
    # watched for the socket's whole life, not one frame at a time: a heartbeat every few seconds from each of
    # thousands of sockets made starting and cancelling these two tasks per frame the socket's largest cost
    slow = asyncio.ensure_future(connection.overflowed.wait())
    kicked = asyncio.ensure_future(connection.kicked.wait())
    try:
        await read_frames(socket, connection, state, sender, lane, heartbeat, largest, slow, kicked)
    finally:
        slow.cancel()
        kicked.cancel()


async def read_frames(socket: WebSocket[Any, Any, Any], connection: Connection, state: State,
                      sender: asyncio.Task[None], lane: Lane, heartbeat: float, largest: int,
                      slow: asyncio.Future[Any], kicked: asyncio.Future[Any]) -> None:
    """serve's loop: one frame at a time, until the client leaves or `slow`, `kicked` or `sender` ends it."""
    while True:
        receive = asyncio.ensure_future(socket.receive_text())
        done, _ = await asyncio.wait({receive, slow, kicked, sender}, timeout=heartbeat,
                                     return_when=asyncio.FIRST_COMPLETED)
        if receive not in done or connection.kicked.is_set():
            receive.cancel()
            with contextlib.suppress(asyncio.CancelledError, WebSocketDisconnect):
                await receive
            if connection.kicked.is_set():
                code, reason, why = connection.kick_code, connection.kick_reason, "kicked"
            elif slow in done:
                code, reason, why = CLOSE_SLOW, "too slow", "slow"
            else:
                code, reason, why = CLOSE_IDLE, "no heartbeat", "idle"
            if sender in done:
                return  # the socket is gone under the sender
            SOCKETS_CLOSED.labels(why).inc()
            with contextlib.suppress(Exception):
                await socket.close(code=code, reason=reason)
            return
        try:
            text = receive.result()
        except WebSocketDisconnect:
            return
        if len(text) > largest or len(text.encode()) > largest:  # uvicorn refuses it earlier; other servers may not
            SOCKETS_CLOSED.labels("too_big").inc()
            with contextlib.suppress(Exception):
                await socket.close(code=CLOSE_TOO_BIG, reason="message too big")
            return
        try:
            message = msgspec.json.decode(text, type=ClientFrame)
        except (msgspec.DecodeError, RecursionError, ValueError):  # deep nesting raises RecursionError
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
        elif message.type == "presence":
            state_now = message.data.get("state")
            if state_now in PRESENCE_STATES:
                connection.foreground = state_now == "foreground"
                await touch(state, connection)  # other instances' pushes go by it from now on
            else:
                connection.offer(error_frame("invalid_presence_state"))
        elif (route := state.get("socket_handlers", {}).get(message.type)) is not None:
            # rtc.offer and rtc.candidate (app/rtc/controllers.py): handled in the lane, the answer back on this socket
            refused = lane.take(route, message.data, lambda: handle(lane, state, socket.user, connection))
            if refused is not None:
                connection.offer(refusal_frame(refused, message.data))
        else:
            connection.offer(error_frame("unsupported_type"))
        connection.ready.set()


async def touch(state: State, connection: Connection) -> None:
    """Renew presence; a Redis hiccup must not cost the client its socket."""
    try:
        await state.presence.touch(connection.user_id, connection.id, connection.foreground)
    except Exception:
        log.warning("presence not renewed", exc_info=True)
