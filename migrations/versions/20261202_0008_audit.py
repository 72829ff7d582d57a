"""The audit log of staff reads of medical data.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-02 00:00:00.000000
"""
from __future__ import annotations

import sqlalchemy as sa
from advanced_alchemy.types import GUID, DateTimeUTC
from alembic import op

revision = '0008'
down_revision = '0007'
branch_labels = None
depends_on = None


# Append-only in the database itself, not only by the code's habit: a row change or delete (and on PostgreSQL a
# TRUNCATE) fails. A retention purge is a deliberate act of the database owner (drop the trigger, delete, restore
# it); a clinic that wants more runs the app as a role granted only INSERT and SELECT on audit_event.
PG_FUNCTION = """
CREATE FUNCTION audit_event_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'audit_event is append-only: % refused', TG_OP USING ERRCODE = 'insufficient_privilege';
END
$$
"""


def upgrade() -> None:
    op.create_table('audit_event',
    sa.Column('id', GUID(length=16), nullable=False),
    sa.Column('at', DateTimeUTC(timezone=True), nullable=False),
    sa.Column('actor_id', GUID(length=16), nullable=False),
    sa.Column('actor_role', sa.String(length=100), nullable=False),
    sa.Column('action', sa.String(length=32), nullable=False),
    sa.Column('target_type', sa.String(length=32), nullable=False),
    sa.Column('target_id', GUID(length=16), nullable=False),
    sa.Column('patient_id', GUID(length=16), nullable=True),
    sa.Column('request_id', sa.String(length=64), nullable=True),
    sa.Column('ip', sa.String(length=64), nullable=True),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_audit_event'))
    )
    with op.batch_alter_table('audit_event', schema=None) as batch_op:
        batch_op.create_index('ix_audit_event_patient', ['patient_id', 'at'], unique=False)
        batch_op.create_index('ix_audit_event_actor', ['actor_id', 'at'], unique=False)
        batch_op.create_index('ix_audit_event_action', ['action', 'at'], unique=False)
        batch_op.create_index('ix_audit_event_at', ['at'], unique=False)
    if op.get_bind().dialect.name == 'postgresql':
        op.execute(PG_FUNCTION)
        op.execute('CREATE TRIGGER audit_event_append_only BEFORE UPDATE OR DELETE ON audit_event '
                   'FOR EACH ROW EXECUTE FUNCTION audit_event_append_only()')
        op.execute('CREATE TRIGGER audit_event_no_truncate BEFORE TRUNCATE ON audit_event '
                   'FOR EACH STATEMENT EXECUTE FUNCTION audit_event_append_only()')
    else:
        for verb in ('UPDATE', 'DELETE'):
            op.execute(f"CREATE TRIGGER audit_event_no_{verb.lower()} BEFORE {verb} ON audit_event "
                       f"BEGIN SELECT RAISE(ABORT, 'audit_event is append-only: {verb} refused'); END")


def downgrade() -> None:
    op.drop_table('audit_event')  # its triggers go with it
    if op.get_bind().dialect.name == 'postgresql':
        op.execute('DROP FUNCTION audit_event_append_only()')
