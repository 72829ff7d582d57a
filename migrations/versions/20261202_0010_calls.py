"""Calls.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-02 03:00:00.000000
"""
from __future__ import annotations

import sqlalchemy as sa
from advanced_alchemy.types import GUID, DateTimeUTC
from alembic import op

revision = '0010'
down_revision = '0009'
branch_labels = None
depends_on = None

LIVE = "state <> 'ended'"
RINGING = "state = 'ringing'"


def upgrade() -> None:
    op.create_table('call',
    sa.Column('id', GUID(length=16), nullable=False),
    sa.Column('consultation_id', GUID(length=16), nullable=False),
    sa.Column('conversation_id', GUID(length=16), nullable=False),
    sa.Column('specialist_id', GUID(length=16), nullable=False),
    sa.Column('patient_id', GUID(length=16), nullable=False),
    sa.Column('state', sa.String(length=16), nullable=False),
    sa.Column('end_reason', sa.String(length=16), nullable=True),
    sa.Column('ring_deadline', DateTimeUTC(timezone=True), nullable=False),
    sa.Column('started_at', DateTimeUTC(timezone=True), nullable=True),
    sa.Column('ended_at', DateTimeUTC(timezone=True), nullable=True),
    sa.Column('node', sa.String(length=300), nullable=False),
    sa.Column('accepted_by', GUID(length=16), nullable=True),
    sa.Column('sa_orm_sentinel', sa.Integer(), nullable=True),
    sa.Column('created_at', DateTimeUTC(timezone=True), nullable=False),
    sa.Column('updated_at', DateTimeUTC(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['consultation_id'], ['consultation.id'], name=op.f('fk_call_consultation_id_consultation'), ondelete='RESTRICT'),
    sa.ForeignKeyConstraint(['specialist_id'], ['user_account.id'], name=op.f('fk_call_specialist_id_user_account'), ondelete='RESTRICT'),
    sa.ForeignKeyConstraint(['patient_id'], ['user_account.id'], name=op.f('fk_call_patient_id_user_account'), ondelete='RESTRICT'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_call'))
    )
    with op.batch_alter_table('call', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_call_consultation_id'), ['consultation_id'], unique=False)
        # one live call per consultation, enforced by the database (two starts at once: one wins)
        batch_op.create_index('uq_call_live_consultation', ['consultation_id'], unique=True,
                              postgresql_where=sa.text(LIVE), sqlite_where=sa.text(LIVE))
        batch_op.create_index('ix_call_ringing_deadline', ['ring_deadline'], unique=False,
                              postgresql_where=sa.text(RINGING), sqlite_where=sa.text(RINGING))
        batch_op.create_index('ix_call_live_node', ['node'], unique=False,
                              postgresql_where=sa.text(LIVE), sqlite_where=sa.text(LIVE))


def downgrade() -> None:
    with op.batch_alter_table('call', schema=None) as batch_op:
        batch_op.drop_index('ix_call_live_node')
        batch_op.drop_index('ix_call_ringing_deadline')
        batch_op.drop_index('uq_call_live_consultation')
        batch_op.drop_index(batch_op.f('ix_call_consultation_id'))
    op.drop_table('call')
