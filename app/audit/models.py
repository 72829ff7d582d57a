"""The audit log's one table: a row per staff read of medical data, written once, never changed.

A Core table rather than an ORM model: rows are only ever inserted in batches and listed, and it carries none of
the created/updated columns of the other models (nothing here is ever updated). No foreign keys: a row records
a fact about an actor and a patient that outlives any change to their accounts, and an insert never waits on
(or fails over) a referenced row.
"""

from __future__ import annotations

from advanced_alchemy.types import GUID, DateTimeUTC
from sqlalchemy import Column, Index, String, Table

from app.db import metadata

audit_event = Table(
    "audit_event", metadata,
    Column("id", GUID, primary_key=True),  # UUIDv7 made when the read happened: ordered like `at`
    Column("at", DateTimeUTC(timezone=True), nullable=False),
    Column("actor_id", GUID, nullable=False),
    Column("actor_role", String(100), nullable=False),  # the staff roles the actor held, comma-separated
    Column("action", String(32), nullable=False),
    Column("target_type", String(32), nullable=False),
    Column("target_id", GUID, nullable=False),
    Column("patient_id", GUID, nullable=True),
    Column("request_id", String(64), nullable=True),
    Column("ip", String(64), nullable=True),
    # the admin's filters, each newest first
    Index("ix_audit_event_patient", "patient_id", "at"),
    Index("ix_audit_event_actor", "actor_id", "at"),
    Index("ix_audit_event_action", "action", "at"),
    Index("ix_audit_event_at", "at"),
)
