"""Group commit for chat sends: the sends that arrive while one group is being written go in the next.

A send alone is written at once, as before; under load, concurrent sends share one transaction, one Redis
round trip for limits and presence, and one publish, so the cost per message falls as the rate rises
instead of the database and Redis round trips queueing up. No send waits on a timer. Each writer keeps one
PostgreSQL connection between its groups (store.HeldConnection): a group is a chain of round trips, and each
is quicker on a backend that has just run than on the pool's least recently used one. Each send is still
answered on its own: (message, created) or its own refusal (SendRules in app/chat/service.py).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

from app import outbox
from app.chat import streams
from app.chat.hub import Bus
from app.chat.service import SendRules, Sent
from app.chat.store import HeldConnection, Send, open_store
from app.db import Database
from app.errors import DomainError, Unavailable

log = logging.getLogger("app.chat")
RETRYABLE = {"40001", "40P01"}  # serialization failure, deadlock: the whole group is tried again


def sqlstate(exc: Exception) -> str | None:
    """PostgreSQL's error code, raised by asyncpg itself or wrapped by SQLAlchemy."""
    code = getattr(exc, "sqlstate", None) or getattr(getattr(exc, "orig", None), "sqlstate", None)
    return code if isinstance(code, str) else None


@dataclass(slots=True)
class Waiting:
    send: Send
    answer: asyncio.Future[Sent] = field(default_factory=lambda: asyncio.get_running_loop().create_future())


class SendQueue:
    """Every chat send of this process passes here: the REST handler waits on its answer."""

    def __init__(self, database: Database, rules: SendRules, bus: Bus, writers: int = 1,
                 max_group: int = 200, timeout: float = 5.0) -> None:
        self.database = database
        self.timeout = timeout
        self.rules = rules
        self.bus = bus
        self.max_group = max_group
        self.writers = writers
        self.pending: list[Waiting] = []
        self.arrived = asyncio.Event()
        self.running = False

    async def send(self, send: Send) -> Sent:
        if not self.running:
            raise Unavailable("the chat is starting or stopping; try again", "chat_unavailable")
        waiting = Waiting(send)
        self.pending.append(waiting)
        self.arrived.set()
        return await waiting.answer

    async def run(self) -> None:
        """The writers: each takes what is pending, writes it as one group, and comes back for more."""
        self.running = True
        try:
            await asyncio.gather(*(self._writer() for _ in range(self.writers)))
        finally:
            self.running = False
            for waiting in self.pending:  # stopping: those not yet written are told to try again
                if not waiting.answer.done():
                    waiting.answer.set_exception(Unavailable("the chat is stopping; try again", "chat_unavailable"))
            self.pending.clear()

    async def _writer(self) -> None:
        held = HeldConnection(self.database)
        try:
            await self._take_groups(held)
        finally:
            await held.drop()

    async def _take_groups(self, held: HeldConnection) -> None:
        while True:
            if not self.pending:
                self.arrived.clear()
                await self.arrived.wait()
                continue
            group, self.pending = self.pending[:self.max_group], self.pending[self.max_group:]
            group = [w for w in group if not w.answer.done()]  # a request given up before its turn
            if not group:
                continue
            try:
                await self._write(group, held)
            except asyncio.CancelledError:  # stopping mid-write: the group is answered, never left hanging
                self._fail(group, "the chat is stopping; try again")
                raise

    async def _write(self, group: list[Waiting], held: HeldConnection) -> None:
        for attempt in (1, 2, 3):
            try:
                outcomes, staged, pushed = await self._commit([w.send for w in group], held)
                break
            except Exception as exc:  # every send of the group is refused alike; the writer goes on
                if attempt < 3 and sqlstate(exc) in RETRYABLE:
                    continue
                log.exception("writing a group of chat messages failed", extra={"group": len(group)})
                self._fail(group, "the message could not be written; send it again with the same client_id")
                return
        if pushed:  # outbox rows committed over a raw connection: wake the workers, as a session's commit would
            outbox.committed()
        if staged.events:  # persisted first, published now
            await self.bus.publish(staged.encode())
        for waiting, outcome in zip(group, outcomes, strict=True):
            if waiting.answer.done():
                continue
            if isinstance(outcome, DomainError):
                waiting.answer.set_exception(outcome)
            else:
                waiting.answer.set_result(outcome)

    async def _commit(self, sends: list[Send],
                      held: HeldConnection) -> tuple[list[Sent | DomainError], streams.Staged, bool]:
        """The group's outcomes, its events to publish, and whether it staged outbox rows."""
        staged = streams.Staged()
        async with open_store(self.database, statement_seconds=self.timeout, held=held) as store:
            outcomes = await self.rules.write(store, staged, sends)
        return outcomes, staged, store.pushed

    @staticmethod
    def _fail(group: list[Waiting], detail: str) -> None:
        for waiting in group:
            if not waiting.answer.done():
                waiting.answer.set_exception(Unavailable(detail, "chat_unavailable"))
