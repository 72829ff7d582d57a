"""Notifications: outbox delivery state, reminders, quiet hours.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-02 00:00:00.000000
"""
from __future__ import annotations

import sqlalchemy as sa
from advanced_alchemy.types import GUID, DateTimeUTC
from alembic import op
from sqlalchemy.dialects import postgresql

revision = '0009'
down_revision = '0008'
branch_labels = None
depends_on = None

PENDING = "dispatched_at IS NULL AND failed_at IS NULL"


def upgrade() -> None:
    # events written before there was a worker were never meant to reach phones now (a message read months ago, a
    # visit long over): they count as dispatched, so the first worker does not push the whole history
    op.execute(sa.text("UPDATE outbox_event SET dispatched_at = CURRENT_TIMESTAMP WHERE dispatched_at IS NULL"))
    with op.batch_alter_table('outbox_event', schema=None) as batch_op:
        batch_op.add_column(sa.Column('attempts', sa.Integer(), nullable=False, server_default='0'))
        batch_op.add_column(sa.Column('next_attempt_at', DateTimeUTC(timezone=True), nullable=False,
                                      server_default=sa.func.now()))
        batch_op.add_column(sa.Column('lease_until', DateTimeUTC(timezone=True), nullable=True))
        batch_op.add_column(sa.Column('lease_owner', sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column('failed_at', DateTimeUTC(timezone=True), nullable=True))
        batch_op.add_column(sa.Column('last_error', sa.String(length=500), nullable=True))
        batch_op.create_index('ix_outbox_event_due', ['next_attempt_at'], unique=False,
                              postgresql_where=sa.text(PENDING), sqlite_where=sa.text(PENDING))
    with op.batch_alter_table('user_account', schema=None) as batch_op:
        batch_op.add_column(sa.Column('quiet_hours_start', sa.String(length=5), nullable=True))
        batch_op.add_column(sa.Column('quiet_hours_end', sa.String(length=5), nullable=True))
        batch_op.add_column(sa.Column('push_topics', sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()),
                                                                           'postgresql'), nullable=True))
    op.create_table('outbox_delivery',
    sa.Column('id', GUID(length=16), nullable=False),
    sa.Column('event_id', GUID(length=16), nullable=False),
    sa.Column('target', sa.String(length=64), nullable=False),
    sa.Column('user_id', GUID(length=16), nullable=False),
    sa.Column('state', sa.String(length=16), nullable=False),
    sa.Column('attempts', sa.Integer(), nullable=False),
    sa.Column('sent_at', DateTimeUTC(timezone=True), nullable=True),
    sa.Column('sa_orm_sentinel', sa.Integer(), nullable=True),
    sa.Column('created_at', DateTimeUTC(timezone=True), nullable=False),
    sa.Column('updated_at', DateTimeUTC(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['event_id'], ['outbox_event.id'], name=op.f('fk_outbox_delivery_event_id_outbox_event'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_outbox_delivery')),
    sa.UniqueConstraint('event_id', 'target', name='uq_outbox_delivery_event_target')
    )
    op.create_table('reminder',
    sa.Column('id', GUID(length=16), nullable=False),
    sa.Column('consultation_id', GUID(length=16), nullable=False),
    sa.Column('offset_minutes', sa.Integer(), nullable=False),
    sa.Column('due_at', DateTimeUTC(timezone=True), nullable=False),
    sa.Column('staged_at', DateTimeUTC(timezone=True), nullable=True),
    sa.Column('sa_orm_sentinel', sa.Integer(), nullable=True),
    sa.Column('created_at', DateTimeUTC(timezone=True), nullable=False),
    sa.Column('updated_at', DateTimeUTC(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['consultation_id'], ['consultation.id'], name=op.f('fk_reminder_consultation_id_consultation'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_reminder')),
    sa.UniqueConstraint('consultation_id', 'offset_minutes', name='uq_reminder_consultation_offset')
    )
    with op.batch_alter_table('reminder', schema=None) as batch_op:
        batch_op.create_index('ix_reminder_due', ['due_at'], unique=False,
                              postgresql_where=sa.text('staged_at IS NULL'), sqlite_where=sa.text('staged_at IS NULL'))


def downgrade() -> None:
    with op.batch_alter_table('reminder', schema=None) as batch_op:
        batch_op.drop_index('ix_reminder_due')
    op.drop_table('reminder')
    op.drop_table('outbox_delivery')
    with op.batch_alter_table('user_account', schema=None) as batch_op:
        batch_op.drop_column('push_topics')
        batch_op.drop_column('quiet_hours_end')
        batch_op.drop_column('quiet_hours_start')
    with op.batch_alter_table('outbox_event', schema=None) as batch_op:
        batch_op.drop_index('ix_outbox_event_due')
        batch_op.drop_column('last_error')
        batch_op.drop_column('failed_at')
        batch_op.drop_column('lease_owner')
        batch_op.drop_column('lease_until')
        batch_op.drop_column('next_attempt_at')
        batch_op.drop_column('attempts')
