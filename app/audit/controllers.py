"""Thin HTTP handler for the audit log: admins read it; nothing writes it over HTTP."""

from __future__ import annotations

from typing import Annotated
from uuid import UUID

from litestar import Controller, get
from litestar.di import NamedDependency, Provide
from litestar.openapi.spec import Example
from litestar.params import FromQuery, Parameter
from sqlalchemy.ext.asyncio import AsyncSession

from app import params
from app.access import ADMINS, only_roles
from app.audit.schemas import AuditEventOut
from app.audit.service import Action, AuditQueries, parse_audit_cursor
from app.schemas import Page
from app.services import audit_queries_for

Limit = Annotated[int, Parameter(ge=1, le=200)]
ActorId = Annotated[UUID | None, Parameter(description="Only reads by this member of staff.",
                                           examples=[Example(value="0193a0c4-2f6e-7d1a-9b3c-5e8f7a6b4c2d")])]
ActionFilter = Annotated[Action | None, Parameter(description="Only this kind of read.",
                                                  examples=[Example(value="card.read")])]


async def provide_audit_queries(db_session: NamedDependency[AsyncSession]) -> AuditQueries:
    return audit_queries_for(db_session)


class AuditController(Controller):
    path = "/api/v1/audit"
    tags = ["audit"]
    dependencies = {"audit_queries": Provide(provide_audit_queries)}

    @get("/", opt=only_roles(*ADMINS))
    async def list_audit_events(self, audit_queries: NamedDependency[AuditQueries],
                                patient_id: FromQuery[UUID | None] = None, actor_id: FromQuery[ActorId] = None,
                                action: FromQuery[ActionFilter] = None, limit: FromQuery[Limit] = 50,
                                cursor: params.Cursor = None) -> Page[AuditEventOut]:
        """Staff reads of medical data, newest first; filters combine."""
        page = await audit_queries.events(patient_id=patient_id, actor_id=actor_id, action=action, limit=limit,
                                          cursor=parse_audit_cursor(cursor))
        return Page(items=[AuditEventOut(id=r.id, at=r.at, actor_id=r.actor_id, actor_role=r.actor_role,
                                         action=r.action, target_type=r.target_type, target_id=r.target_id,
                                         patient_id=r.patient_id, request_id=r.request_id, ip=r.ip)
                           for r in page.rows], next_cursor=page.next_cursor)
