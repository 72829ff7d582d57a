"""The audit log on the wire."""

from __future__ import annotations

import datetime as dt
from uuid import UUID

from app.schemas import Out


class AuditEventOut(Out):
    id: UUID
    at: dt.datetime
    actor_id: UUID
    actor_role: str  # the staff roles the actor held, comma-separated ("doctor", "admin,doctor")
    action: str
    target_type: str
    target_id: UUID
    patient_id: UUID | None
    request_id: str | None
    ip: str | None
