"""Access that ends before its tokens expire: logouts, reused refresh tokens, deactivated or changed accounts.

Two kinds of revocation, both persisted (AccessRevocation) and then broadcast to every process: a per-user
"valid after" time (tokens of that user issued earlier are refused) and a per-login one (tokens of that
refresh family are refused). Each process keeps what it heard in memory for an access token's lifetime,
loaded from the database at start-up, on every re-subscription (a publish lost while a process was away
is healed there) and every few seconds while there is no subscription (Redis down, or the embedded profile,
which has no broker), so checking a token stays free of I/O.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import time
from collections.abc import Callable, Coroutine, Iterable, Mapping
from typing import Any, Literal, Protocol
from uuid import UUID

import msgspec
from redis.asyncio import Redis
from sqlalchemy import delete, select

from app.accounts.models import AccessRevocation
from app.db import Database
from app.tasks import cancel_until_done

log = logging.getLogger("app.revocation")
CHANNEL = "clinic:revocations"
CLOSE_REVOKED = 4401  # the close code of a socket whose access was revoked
FORGET_SECONDS = 600  # how often an instance deletes the revocations older than a token's lifetime


class Revocation(msgspec.Struct, frozen=True):
    user_id: UUID
    at: float  # epoch seconds: the user's tokens issued before it end (sid None), or when that login ended
    sid: UUID | None = None  # the login (refresh family) that ended; None: every login of the user


class Revocations:
    """What this process knows of ended access; `allows` is the check every token passes, cache hit or not."""

    def __init__(self, keep_seconds: float) -> None:
        self.keep_seconds = keep_seconds + 60  # a token's lifetime, and some clock skew between instances
        self._valid_after: dict[UUID, float] = {}
        self._ended: dict[UUID, float] = {}  # sid -> when it ended
        self._listeners: list[Callable[[Revocation], None]] = []
        self._changed = asyncio.Event()
        self._pruned_at = time.time()
        self.bus: RevocationBus = LocalRevocationBus()  # the app sets its own (app/main.py)

    def allows(self, user_id: UUID, sid: UUID | None, issued_at: float) -> bool:
        after = self._valid_after.get(user_id)
        if after is not None and issued_at < after:
            return False
        return sid is None or sid not in self._ended

    def on_revocation(self, listener: Callable[[Revocation], None]) -> None:
        self._listeners.append(listener)

    def apply(self, revocation: Revocation) -> None:
        """Remember a revocation (each may arrive more than once: from this process, the bus, a reload)."""
        now = time.time()
        if revocation.at < now - self.keep_seconds:
            return  # every token it could end has expired
        if revocation.sid is not None:
            known = revocation.sid in self._ended
            self._ended[revocation.sid] = revocation.at
        else:
            known = self._valid_after.get(revocation.user_id, 0.0) >= revocation.at
            if not known:
                self._valid_after[revocation.user_id] = revocation.at
        if now - self._pruned_at > 60:
            self._prune(now)
        if known:
            return
        for listener in self._listeners:
            try:
                listener(revocation)
            except Exception:  # a listener's failure must not stop the others, nor the revocation
                log.exception("revocation listener failed")
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    def changed(self) -> Coroutine[Any, Any, Literal[True]]:
        """What to await for the next revocation this process learns of (taken now: none in between is missed)."""
        return self._changed.wait()

    async def announce(self, revocation: Revocation) -> None:
        """After the revocation has committed: this process knows it at once, every other one hears it."""
        self.apply(revocation)
        await self.bus.publish(revocation)

    async def load(self, database: Database) -> None:
        """Every revocation of the last token lifetime, from the database."""
        since = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=self.keep_seconds)
        async with database.reader() as session:
            rows = await session.execute(select(AccessRevocation.user_id, AccessRevocation.family_id,
                                                AccessRevocation.not_before)
                                         .where(AccessRevocation.not_before >= since))
            for row in rows:
                self.apply(Revocation(user_id=row.user_id, sid=row.family_id, at=row.not_before.timestamp()))

    async def forget(self, database: Database) -> None:
        """Delete the rows every token they could end has outlived (any instance may: deleting twice is fine)."""
        since = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=self.keep_seconds)
        async with database.writer() as session:
            await session.execute(delete(AccessRevocation).where(AccessRevocation.not_before < since))
            await session.commit()

    async def reload_quietly(self, database: Database) -> bool:
        """load, a database failure logged instead of raised (the next round tries again)."""
        try:
            await self.load(database)
        except Exception:
            log.warning("loading revocations failed", exc_info=True)
            return False
        return True

    async def keep_table_small(self, database: Database) -> None:
        """At start, then every FORGET_SECONDS: the table holds one token lifetime, not all history."""
        while True:
            try:
                await self.forget(database)
            except Exception:  # a passing database hiccup must not end the loop
                log.warning("forgetting old revocations failed", exc_info=True)
            await asyncio.sleep(FORGET_SECONDS)

    def _prune(self, now: float) -> None:
        cutoff = now - self.keep_seconds
        self._valid_after = {u: t for u, t in self._valid_after.items() if t >= cutoff}
        self._ended = {s: t for s, t in self._ended.items() if t >= cutoff}
        self._pruned_at = now


class Socket(Protocol):
    sid: UUID | None

    def kick(self, code: int, reason: str) -> None: ...


class Sockets(Protocol):
    """The realtime hub as seen from here (app/chat/hub.py Hub), so accounts never import chat."""

    @property
    def connections(self) -> Mapping[UUID, Iterable[Socket]]: ...

    def kick_user(self, user_id: UUID, code: int, reason: str) -> int: ...


def close_sockets(hub: Sockets) -> Callable[[Revocation], None]:
    """A listener that ends the revoked user's sockets on this process (only that login's, for a login)."""

    def close(revocation: Revocation) -> None:
        if revocation.sid is None:
            hub.kick_user(revocation.user_id, CLOSE_REVOKED, "access revoked")
            return
        for connection in list(hub.connections.get(revocation.user_id, ())):
            if connection.sid == revocation.sid:
                connection.kick(CLOSE_REVOKED, "access revoked")

    return close


class RevocationBus(Protocol):
    async def publish(self, revocation: Revocation) -> None: ...

    async def run(self, revocations: Revocations, database: Database, ready: asyncio.Event) -> None: ...


class LocalRevocationBus:
    """The embedded profile: no broker. This process applies its own revocations at once; what other
    processes on the same database revoked arrives by reloading it every `poll_seconds`."""

    def __init__(self, poll_seconds: float = 2.0) -> None:
        self.poll_seconds = poll_seconds

    async def publish(self, revocation: Revocation) -> None:
        return None  # persisted already: the other processes read it at their next reload

    async def run(self, revocations: Revocations, database: Database, ready: asyncio.Event) -> None:
        while True:
            if await revocations.reload_quietly(database):
                ready.set()
            await asyncio.sleep(self.poll_seconds)


class RedisRevocationBus:
    """Every process hears every revocation (its own too: applying twice changes nothing). While the
    subscription is down, the database is reloaded every `poll_seconds`: revocations still arrive within
    seconds, and an instance started while Redis is away knows the recent ones before it serves a token."""

    def __init__(self, redis: Redis, poll_seconds: float) -> None:
        self.redis = redis
        self.poll_seconds = poll_seconds
        self._subscribed = False

    async def publish(self, revocation: Revocation) -> None:
        try:
            await self.redis.publish(CHANNEL, msgspec.json.encode(revocation))
        except Exception:  # persisted already: the other processes load it when their subscription comes back
            log.warning("revocation publish failed", exc_info=True)

    async def run(self, revocations: Revocations, database: Database, ready: asyncio.Event) -> None:
        polling = asyncio.create_task(self._poll_while_away(revocations, database, ready))
        try:
            await self._listen(revocations, database, ready)
        finally:  # awaited: a reload cut off mid-query must give its connection back before the pool goes
            await cancel_until_done(polling)

    async def _poll_while_away(self, revocations: Revocations, database: Database, ready: asyncio.Event) -> None:
        while True:  # the first round runs at once: Redis may be down at start
            if not self._subscribed and await revocations.reload_quietly(database):
                ready.set()
            await asyncio.sleep(self.poll_seconds)

    async def _listen(self, revocations: Revocations, database: Database, ready: asyncio.Event) -> None:
        decoder = msgspec.json.Decoder(Revocation)
        while True:
            try:
                async with self.redis.pubsub(ignore_subscribe_messages=True) as pubsub:
                    await pubsub.subscribe(CHANNEL)
                    await revocations.load(database)  # subscribed first, then loaded: no gap between the two
                    self._subscribed = True
                    ready.set()
                    async for message in pubsub.listen():
                        if message.get("type") == "message":
                            try:
                                revocations.apply(decoder.decode(message["data"]))
                            except msgspec.DecodeError:
                                log.warning("malformed revocation ignored")
            except asyncio.CancelledError:
                raise
            except Exception:
                log.warning("revocation subscription lost; reconnecting", exc_info=True)
            finally:
                self._subscribed = False
            await asyncio.sleep(0.5)
