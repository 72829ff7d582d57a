"""Group commit for chat sends: the sends that arrive while one group is being written go in the next.

A send alone is written at once, as before; under load, concurrent sends share one transaction, one Redis
round trip for limits and presence, and one publish, so the cost per message falls as the rate rises
instead of the database and Redis round trips queueing up. No send waits on a timer. Each send is still
answered on its own: (message, created) or its own refusal (ChatService.send_many).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncSession

from app.chat import streams
from app.chat.hub import Bus
from app.chat.service import ChatService, Send, Sent
from app.db import Database
from app.errors import DomainError, Unavailable

log = logging.getLogger("app.chat")
RETRYABLE = {"40001", "40P01"}  # serialization failure, deadlock: the whole group is tried again


@dataclass(slots=True)
class Waiting:
    send: Send
    answer: asyncio.Future[Sent] = field(default_factory=lambda: asyncio.get_running_loop().create_future())


class SendQueue:
    def __init__(self, database: Database, chat_for: Callable[[AsyncSession], ChatService], bus: Bus,
                 writers: int = 1, max_group: int = 200) -> None:
        self.database = database
        self.chat_for = chat_for
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
                await self._write(group)
            except asyncio.CancelledError:  # stopping mid-write: the group is answered, never left hanging
                self._fail(group, "the chat is stopping; try again")
                raise

    async def _write(self, group: list[Waiting]) -> None:
        for attempt in (1, 2, 3):
            try:
                outcomes, staged = await self._commit([w.send for w in group])
                break
            except Exception as exc:  # every send of the group is refused alike; the writer goes on
                if (attempt < 3 and isinstance(exc, DBAPIError)
                        and getattr(exc.orig, "sqlstate", None) in RETRYABLE):
                    continue
                log.exception("writing a group of chat messages failed", extra={"group": len(group)})
                self._fail(group, "the message could not be written; send it again with the same client_id")
                return
        if staged.events:  # persisted first, published now
            await self.bus.publish(staged.encode())
        for waiting, outcome in zip(group, outcomes, strict=True):
            if waiting.answer.done():
                continue
            if isinstance(outcome, DomainError):
                waiting.answer.set_exception(outcome)
            else:
                waiting.answer.set_result(outcome)

    async def _commit(self, sends: list[Send]) -> tuple[list[Sent | DomainError], streams.Staged]:
        async with self.database.writer() as session:
            outcomes = await self.chat_for(session).send_many(sends)
            await session.commit()
            return outcomes, streams.staged_for(session)

    @staticmethod
    def _fail(group: list[Waiting], detail: str) -> None:
        for waiting in group:
            if not waiting.answer.done():
                waiting.answer.set_exception(Unavailable(detail, "chat_unavailable"))
