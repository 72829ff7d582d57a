"""Thin HTTP handlers: the outbox rows the worker gave up on (admins)."""

from __future__ import annotations

import datetime as dt
from typing import Annotated
from uuid import UUID

from litestar import Controller, get
from litestar.di import NamedDependency
from litestar.params import FromQuery, Parameter
from sqlalchemy.ext.asyncio import AsyncSession

from app import params
from app.access import ADMINS, only_roles
from app.accounts.controllers import parse_cursor
from app.notifications.worker import failed_events
from app.outbox import OutboxEvent
from app.schemas import Out, Page


class FailedEventOut(Out):
    """An outbox row not delivered to every target after OUTBOX_MAX_ATTEMPTS (ids only: no payload)."""

    id: UUID
    type: str
    aggregate_id: UUID | None
    recipients: list[str]
    attempts: int
    last_error: str | None
    created_at: dt.datetime
    failed_at: dt.datetime | None


def failed_out(e: OutboxEvent) -> FailedEventOut:
    return FailedEventOut(id=e.id, type=e.type, aggregate_id=e.aggregate_id, recipients=list(e.recipients),
                          attempts=e.attempts, last_error=e.last_error, created_at=e.created_at,
                          failed_at=e.failed_at)


class OutboxController(Controller):
    path = "/api/v1/outbox"
    tags = ["notifications"]

    @get("/failed", opt=only_roles(*ADMINS))
    async def list_failed(self, db_session: NamedDependency[AsyncSession],
                          limit: FromQuery[Annotated[int, Parameter(ge=1, le=200)]] = 50,
                          cursor: params.Cursor = None) -> Page[FailedEventOut]:
        """Pushes and reminders the worker gave up on, newest first."""
        rows = await failed_events(db_session, limit, parse_cursor(cursor))
        return Page(items=[failed_out(e) for e in rows[:limit]],
                    next_cursor=str(rows[limit - 1].id) if len(rows) > limit else None)


