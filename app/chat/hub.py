"""Who is connected to this process, who is online anywhere, and the bus that carries events between processes.

Persist first, then publish: the bus carries only events already committed to their streams, so a lost
publish (Redis pub/sub drops what nobody hears) is healed from the database, never lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import Callable
from typing import Any, Protocol
from uuid import UUID, uuid4

from redis.asyncio import Redis

from app.chat.streams import decode

log = logging.getLogger("app.realtime")
CHANNEL = "clinic:events"
_opened = itertools.count()  # the order sockets opened in, to find a user's oldest


class Connection:
    """One client socket: a bounded queue of events for it and the last stream position it was sent."""

    def __init__(self, user_id: UUID, limit: int, sid: UUID | None = None) -> None:
        self.id = uuid4().hex
        self.opened = next(_opened)
        self.user_id = user_id
        self.sid = sid  # the login whose token opened it: a revoked login closes only its own sockets
        self.queue: asyncio.Queue[Any] = asyncio.Queue(maxsize=limit)  # events, raw frames, resumes
        self.started_at = 0  # the stream position when the socket opened: later events are sent live
        self.last_seq = 0  # the last position sent in order
        self.resume_from: int | None = None  # what a first-frame resume asked for
        self.foreground = True  # from connect until the client says it went to the background (API.md "Push")
        self.ready = asyncio.Event()  # the client has said its first word
        self.overflowed = asyncio.Event()
        self.kicked = asyncio.Event()  # the server ends this socket (revoked access, too many sockets)
        self.kick_code, self.kick_reason = 1000, ""

    def kick(self, code: int, reason: str) -> None:
        """Ask the socket's reader to close it with this code; the first reason given wins."""
        if not self.kicked.is_set():
            self.kick_code, self.kick_reason = code, reason
            self.kicked.set()

    def offer(self, item: Any) -> None:
        try:
            self.queue.put_nowait(item)
        except asyncio.QueueFull:  # a client that does not read is let go, not buffered without bound
            self.overflowed.set()


class Hub:
    def __init__(self) -> None:
        self.connections: dict[UUID, set[Connection]] = {}

    def add(self, connection: Connection) -> None:
        self.connections.setdefault(connection.user_id, set()).add(connection)

    def remove(self, connection: Connection) -> None:
        mine = self.connections.get(connection.user_id)
        if mine is not None:
            mine.discard(connection)
            if not mine:
                del self.connections[connection.user_id]

    def oldest_beyond(self, user_id: UUID, limit: int) -> list[Connection]:
        """This user's oldest live sockets past the newest `limit` of them (those already closing do not count)."""
        mine = sorted((c for c in self.connections.get(user_id, ()) if not c.kicked.is_set()), key=lambda c: c.opened)
        return mine[:max(0, len(mine) - limit)]

    def kick_user(self, user_id: UUID, code: int, reason: str) -> int:
        """Close every socket of this user on this process; how many there were."""
        mine = list(self.connections.get(user_id, ()))
        for connection in mine:
            connection.kick(code, reason)
        return len(mine)

    def deliver(self, raw: bytes) -> None:
        for event in decode(raw):
            for connection in self.connections.get(event.recipient_id, ()):
                connection.offer(event)

    @property
    def count(self) -> int:
        return sum(len(c) for c in self.connections.values())


class Bus(Protocol):
    async def publish(self, raw: bytes) -> None: ...

    async def run(self, deliver: Callable[[bytes], None]) -> None: ...


class InProcessBus:
    """The embedded profile's bus: one process, so publishing is delivering."""

    def __init__(self) -> None:
        self._deliver: Callable[[bytes], None] | None = None

    async def publish(self, raw: bytes) -> None:
        if self._deliver is not None:
            self._deliver(raw)

    async def run(self, deliver: Callable[[bytes], None]) -> None:
        self._deliver = deliver
        await asyncio.Event().wait()  # nothing to listen to; lives as long as the app


class RedisBus:
    """Every process hears every event batch and keeps those for its own sockets."""

    def __init__(self, redis: Redis) -> None:
        self.redis = redis

    async def publish(self, raw: bytes) -> None:
        for attempt in (1, 2):
            try:
                await self.redis.publish(CHANNEL, raw)
                return
            except Exception:  # committed already: a socket heals the gap at its next event or resume
                log.warning("publish failed", exc_info=True, extra={"attempt": attempt})

    async def run(self, deliver: Callable[[bytes], None]) -> None:
        while True:
            try:
                async with self.redis.pubsub(ignore_subscribe_messages=True) as pubsub:
                    await pubsub.subscribe(CHANNEL)
                    async for message in pubsub.listen():
                        if message.get("type") == "message":
                            deliver(message["data"])
            except asyncio.CancelledError:
                raise
            except Exception:
                log.warning("event subscription lost; reconnecting", exc_info=True)
                await asyncio.sleep(0.5)


class Presence(Protocol):
    async def touch(self, user_id: UUID, connection_id: str, foreground: bool = True) -> None:
        """The socket is alive (for another TTL), in the foreground or not (API.md "Push")."""
        ...

    async def leave(self, user_id: UUID, connection_id: str) -> None: ...

    async def online(self, user_ids: list[UUID]) -> set[UUID]: ...

    async def foreground(self, user_ids: list[UUID]) -> set[UUID]:
        """Those with a socket in the foreground on any instance: they see events live, so get no push."""
        ...


class InProcessPresence:
    def __init__(self, ttl: float) -> None:
        self.ttl = ttl
        self._seen: dict[UUID, dict[str, float]] = {}
        self._front: dict[UUID, dict[str, float]] = {}  # the same, for sockets in the foreground

    async def touch(self, user_id: UUID, connection_id: str, foreground: bool = True) -> None:
        until = time.monotonic() + self.ttl
        self._seen.setdefault(user_id, {})[connection_id] = until
        if foreground:
            self._front.setdefault(user_id, {})[connection_id] = until
        else:
            _drop(self._front, user_id, connection_id)

    async def leave(self, user_id: UUID, connection_id: str) -> None:
        _drop(self._seen, user_id, connection_id)
        _drop(self._front, user_id, connection_id)

    async def online(self, user_ids: list[UUID]) -> set[UUID]:
        now = time.monotonic()
        return {u for u in user_ids if any(t > now for t in self._seen.get(u, {}).values())}

    async def foreground(self, user_ids: list[UUID]) -> set[UUID]:
        now = time.monotonic()
        return {u for u in user_ids if any(t > now for t in self._front.get(u, {}).values())}


def _retrieved(future: asyncio.Future[None]) -> None:
    """Mark a batch's failure as heard even when every caller gave up on it (no "never retrieved" warning)."""
    if not future.cancelled():
        future.exception()


def _drop(seen: dict[UUID, dict[str, float]], user_id: UUID, connection_id: str) -> None:
    mine = seen.get(user_id, {})
    mine.pop(connection_id, None)
    if not mine:
        seen.pop(user_id, None)


# per key, in order: "1" when the sorted set has a member scored at or after ARGV[1] (a live socket), else "0"
_COUNT_LIVE = ("local marks = {} for i, key in ipairs(KEYS) do "
               "marks[i] = redis.call('ZCOUNT', key, ARGV[1], '+inf') > 0 and '1' or '0' end "
               "return table.concat(marks)")


class RedisPresence:
    """A sorted set per user: member = socket, score = when it stops counting unless a heartbeat renews it;
    a second one per user holds only the sockets in the foreground, expiring the same way.

    Heartbeats are renewed together: the touches that arrive while one batch is on its way to Redis go in the
    next, one pipeline for all of them, and each caller waits for its own batch. Ten thousand sockets pinging
    every ten seconds are a thousand touches a second; a round trip each would queue on the connection pool
    and cost the event loop a pipeline apiece.

    This process's own sockets are also known here (`local`, renewed and dropped with them): a user with one
    of them in the foreground is answered without asking Redis, which is asked only about the others. A chat
    send asks about its recipients, and most of them are usually connected to the instance that took it."""

    def __init__(self, redis: Redis, ttl: float) -> None:
        self.redis = redis
        self.ttl = ttl
        self.local = InProcessPresence(ttl)
        # one command (by its hash) for any number of users, not a pipelined ZCOUNT each: a chat list asks about
        # a page of patients at once, and redis-py's pipeline costs tens of microseconds a command in Python
        self._count_live = redis.register_script(_COUNT_LIVE)
        self._pending: dict[tuple[UUID, str], bool] = {}  # (user, socket) -> in the foreground
        self._next: asyncio.Future[None] | None = None  # done when the pending touches are written
        self._flusher: asyncio.Task[None] | None = None

    async def touch(self, user_id: UUID, connection_id: str, foreground: bool = True) -> None:
        await self.local.touch(user_id, connection_id, foreground)
        self._pending[(user_id, connection_id)] = foreground  # a later touch of the same socket wins
        if self._next is None:
            self._next = asyncio.get_running_loop().create_future()
            self._next.add_done_callback(_retrieved)
            if self._flusher is None or self._flusher.done():
                self._flusher = asyncio.create_task(self._flush())
        await asyncio.shield(self._next)  # a caller that gives up leaves the batch to the others

    async def _flush(self) -> None:
        while self._next is not None:
            batch, self._pending = self._pending, {}
            written, self._next = self._next, None
            until, ttl = time.time() + self.ttl, int(self.ttl) + 1
            try:
                async with self.redis.pipeline(transaction=False) as pipe:
                    for (user_id, connection_id), foreground in batch.items():
                        key, front = f"presence:{user_id}", f"presence:fg:{user_id}"
                        pipe.zadd(key, {connection_id: until})
                        pipe.expire(key, ttl)
                        if foreground:
                            pipe.zadd(front, {connection_id: until})
                            pipe.expire(front, ttl)
                        else:
                            pipe.zrem(front, connection_id)
                    await pipe.execute()
            except Exception as exc:  # each caller hears it (the gateway logs it and keeps the socket)
                written.set_exception(exc)
            except asyncio.CancelledError:
                written.cancel()
                if self._next is not None:
                    self._next.cancel()
                    self._next = None
                raise
            else:
                written.set_result(None)

    async def leave(self, user_id: UUID, connection_id: str) -> None:
        await self.local.leave(user_id, connection_id)
        with contextlib.suppress(Exception):
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.zrem(f"presence:{user_id}", connection_id)
                pipe.zrem(f"presence:fg:{user_id}", connection_id)
                await pipe.execute()

    async def foreground(self, user_ids: list[UUID]) -> set[UUID]:
        here = await self.local.foreground(user_ids)
        return here | await self._counted("presence:fg:", [u for u in user_ids if u not in here])

    async def online(self, user_ids: list[UUID]) -> set[UUID]:
        here = await self.local.online(user_ids)
        return here | await self._counted("presence:", [u for u in user_ids if u not in here])

    async def _counted(self, prefix: str, user_ids: list[UUID]) -> set[UUID]:
        """Those with a live member in their set under `prefix`, on any instance: one round trip for all."""
        if not user_ids:
            return set()
        marks = await self._count_live(keys=[f"{prefix}{u}" for u in user_ids], args=[time.time()])
        marks = marks.decode() if isinstance(marks, bytes) else str(marks)
        return {u for u, mark in zip(user_ids, marks, strict=True) if mark == "1"}
