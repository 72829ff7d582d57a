"""Scheduling and consultations: services, schedules, slots, waitlist, consultations, payments,
conclusions with analysis orders, ratings, and the outbox of domain events.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-26 01:23:55.432092
"""
from __future__ import annotations

import sqlalchemy as sa
from advanced_alchemy.types import GUID, DateTimeUTC
from alembic import op
from sqlalchemy.dialects import postgresql

revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('clinic_service',
    sa.Column('id', GUID(length=16), nullable=False),
    sa.Column('specialty', sa.String(length=32), nullable=False),
    sa.Column('title', sa.String(length=200), nullable=False),
    sa.Column('duration_minutes', sa.Integer(), nullable=False),
    sa.Column('price', sa.Numeric(precision=10, scale=2), nullable=False),
    sa.Column('in_person_only', sa.Boolean(), nullable=False),
    sa.Column('stage', sa.String(length=16), nullable=False),
    sa.Column('active', sa.Boolean(), nullable=False),
    sa.Column('sa_orm_sentinel', sa.Integer(), nullable=True),
    sa.Column('created_at', DateTimeUTC(timezone=True), nullable=False),
    sa.Column('updated_at', DateTimeUTC(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_clinic_service'))
    )
    with op.batch_alter_table('clinic_service', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_clinic_service_specialty'), ['specialty'], unique=False)

    op.create_table('outbox_event',
    sa.Column('id', GUID(length=16), nullable=False),
    sa.Column('type', sa.String(length=64), nullable=False),
    sa.Column('aggregate_id', GUID(length=16), nullable=True),
    sa.Column('recipients', sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql'), nullable=False),
    sa.Column('payload', sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql'), nullable=False),
    sa.Column('dispatched_at', DateTimeUTC(timezone=True), nullable=True),
    sa.Column('sa_orm_sentinel', sa.Integer(), nullable=True),
    sa.Column('created_at', DateTimeUTC(timezone=True), nullable=False),
    sa.Column('updated_at', DateTimeUTC(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_outbox_event'))
    )
    with op.batch_alter_table('outbox_event', schema=None) as batch_op:
        batch_op.create_index('ix_outbox_event_pending', ['dispatched_at', 'created_at'], unique=False)

    op.create_table('schedule',
    sa.Column('id', GUID(length=16), nullable=False),
    sa.Column('specialist_id', GUID(length=16), nullable=False),
    sa.Column('timezone', sa.String(length=64), nullable=False),
    sa.Column('slot_minutes', sa.Integer(), nullable=False),
    sa.Column('horizon_days', sa.Integer(), nullable=False),
    sa.Column('weekly', sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql'), nullable=False),
    sa.Column('breaks', sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql'), nullable=False),
    sa.Column('sa_orm_sentinel', sa.Integer(), nullable=True),
    sa.Column('created_at', DateTimeUTC(timezone=True), nullable=False),
    sa.Column('updated_at', DateTimeUTC(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['specialist_id'], ['user_account.id'], name=op.f('fk_schedule_specialist_id_user_account'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_schedule')),
    sa.UniqueConstraint('specialist_id', name=op.f('uq_schedule_specialist_id'))
    )
    op.create_table('slot',
    sa.Column('id', GUID(length=16), nullable=False),
    sa.Column('specialist_id', GUID(length=16), nullable=False),
    sa.Column('starts_at', DateTimeUTC(timezone=True), nullable=False),
    sa.Column('ends_at', DateTimeUTC(timezone=True), nullable=False),
    sa.Column('consultation_id', GUID(length=16), nullable=True),
    sa.Column('hold_id', GUID(length=16), nullable=True),
    sa.Column('held_by', GUID(length=16), nullable=True),
    sa.Column('held_until', DateTimeUTC(timezone=True), nullable=True),
    sa.Column('sa_orm_sentinel', sa.Integer(), nullable=True),
    sa.Column('created_at', DateTimeUTC(timezone=True), nullable=False),
    sa.Column('updated_at', DateTimeUTC(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['specialist_id'], ['user_account.id'], name=op.f('fk_slot_specialist_id_user_account'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_slot')),
    sa.UniqueConstraint('specialist_id', 'starts_at', name='uq_slot_specialist_start')
    )
    with op.batch_alter_table('slot', schema=None) as batch_op:
        batch_op.create_index('ix_slot_free_by_time', ['starts_at', 'specialist_id'], unique=False)

    op.create_table('waitlist_request',
    sa.Column('id', GUID(length=16), nullable=False),
    sa.Column('patient_id', GUID(length=16), nullable=False),
    sa.Column('requested_by', GUID(length=16), nullable=False),
    sa.Column('specialty', sa.String(length=32), nullable=False),
    sa.Column('specialist_id', GUID(length=16), nullable=True),
    sa.Column('note', sa.String(length=1000), nullable=False),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('resolved_by', GUID(length=16), nullable=True),
    sa.Column('resolution', sa.String(length=1000), nullable=True),
    sa.Column('notified_at', DateTimeUTC(timezone=True), nullable=True),
    sa.Column('sa_orm_sentinel', sa.Integer(), nullable=True),
    sa.Column('created_at', DateTimeUTC(timezone=True), nullable=False),
    sa.Column('updated_at', DateTimeUTC(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['patient_id'], ['user_account.id'], name=op.f('fk_waitlist_request_patient_id_user_account'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['requested_by'], ['user_account.id'], name=op.f('fk_waitlist_request_requested_by_user_account'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['specialist_id'], ['user_account.id'], name=op.f('fk_waitlist_request_specialist_id_user_account'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_waitlist_request'))
    )
    with op.batch_alter_table('waitlist_request', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_waitlist_request_patient_id'), ['patient_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_waitlist_request_specialty'), ['specialty'], unique=False)
        batch_op.create_index(batch_op.f('ix_waitlist_request_status'), ['status'], unique=False)

    op.create_table('consultation',
    sa.Column('id', GUID(length=16), nullable=False),
    sa.Column('patient_id', GUID(length=16), nullable=False),
    sa.Column('specialist_id', GUID(length=16), nullable=False),
    sa.Column('service_id', GUID(length=16), nullable=False),
    sa.Column('slot_id', GUID(length=16), nullable=False),
    sa.Column('specialty', sa.String(length=32), nullable=False),
    sa.Column('starts_at', DateTimeUTC(timezone=True), nullable=False),
    sa.Column('ends_at', DateTimeUTC(timezone=True), nullable=False),
    sa.Column('format', sa.String(length=16), nullable=False),
    sa.Column('status', sa.String(length=32), nullable=False),
    sa.Column('paid', sa.Boolean(), nullable=False),
    sa.Column('booked_by', GUID(length=16), nullable=False),
    sa.Column('cancel_reason', sa.String(length=500), nullable=True),
    sa.Column('started_at', DateTimeUTC(timezone=True), nullable=True),
    sa.Column('completed_at', DateTimeUTC(timezone=True), nullable=True),
    sa.Column('conversation_id', GUID(length=16), nullable=True),
    sa.Column('sa_orm_sentinel', sa.Integer(), nullable=True),
    sa.Column('created_at', DateTimeUTC(timezone=True), nullable=False),
    sa.Column('updated_at', DateTimeUTC(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['patient_id'], ['user_account.id'], name=op.f('fk_consultation_patient_id_user_account'), ondelete='RESTRICT'),
    sa.ForeignKeyConstraint(['service_id'], ['clinic_service.id'], name=op.f('fk_consultation_service_id_clinic_service'), ondelete='RESTRICT'),
    sa.ForeignKeyConstraint(['slot_id'], ['slot.id'], name=op.f('fk_consultation_slot_id_slot'), ondelete='RESTRICT'),
    sa.ForeignKeyConstraint(['specialist_id'], ['user_account.id'], name=op.f('fk_consultation_specialist_id_user_account'), ondelete='RESTRICT'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_consultation'))
    )
    with op.batch_alter_table('consultation', schema=None) as batch_op:
        batch_op.create_index('ix_consultation_patient_time', ['patient_id', 'starts_at'], unique=False)
        batch_op.create_index('ix_consultation_specialist_time', ['specialist_id', 'starts_at'], unique=False)
        batch_op.create_index(batch_op.f('ix_consultation_status'), ['status'], unique=False)
        batch_op.create_index('uq_consultation_live_slot', ['slot_id'], unique=True, postgresql_where=sa.text("status <> 'cancelled'"), sqlite_where=sa.text("status <> 'cancelled'"))

    op.create_table('conclusion',
    sa.Column('id', GUID(length=16), nullable=False),
    sa.Column('consultation_id', GUID(length=16), nullable=False),
    sa.Column('patient_id', GUID(length=16), nullable=False),
    sa.Column('author_id', GUID(length=16), nullable=False),
    sa.Column('author_role', sa.String(length=32), nullable=False),
    sa.Column('diagnoses', sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql'), nullable=False),
    sa.Column('recommendations', sa.Text(), nullable=False),
    sa.Column('treatment', sa.Text(), nullable=False),
    sa.Column('follow_up', sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql'), nullable=True),
    sa.Column('sa_orm_sentinel', sa.Integer(), nullable=True),
    sa.Column('created_at', DateTimeUTC(timezone=True), nullable=False),
    sa.Column('updated_at', DateTimeUTC(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['author_id'], ['user_account.id'], name=op.f('fk_conclusion_author_id_user_account'), ondelete='RESTRICT'),
    sa.ForeignKeyConstraint(['consultation_id'], ['consultation.id'], name=op.f('fk_conclusion_consultation_id_consultation'), ondelete='RESTRICT'),
    sa.ForeignKeyConstraint(['patient_id'], ['user_account.id'], name=op.f('fk_conclusion_patient_id_user_account'), ondelete='RESTRICT'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_conclusion')),
    sa.UniqueConstraint('consultation_id', name=op.f('uq_conclusion_consultation_id'))
    )
    with op.batch_alter_table('conclusion', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_conclusion_patient_id'), ['patient_id'], unique=False)

    op.create_table('payment',
    sa.Column('id', GUID(length=16), nullable=False),
    sa.Column('consultation_id', GUID(length=16), nullable=False),
    sa.Column('amount', sa.Numeric(precision=10, scale=2), nullable=False),
    sa.Column('method', sa.String(length=16), nullable=False),
    sa.Column('reference', sa.String(length=128), nullable=False),
    sa.Column('recorded_by', GUID(length=16), nullable=False),
    sa.Column('sa_orm_sentinel', sa.Integer(), nullable=True),
    sa.Column('created_at', DateTimeUTC(timezone=True), nullable=False),
    sa.Column('updated_at', DateTimeUTC(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['consultation_id'], ['consultation.id'], name=op.f('fk_payment_consultation_id_consultation'), ondelete='RESTRICT'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_payment')),
    sa.UniqueConstraint('reference', name=op.f('uq_payment_reference'))
    )
    with op.batch_alter_table('payment', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_payment_consultation_id'), ['consultation_id'], unique=False)

    op.create_table('rating',
    sa.Column('id', GUID(length=16), nullable=False),
    sa.Column('consultation_id', GUID(length=16), nullable=False),
    sa.Column('specialist_id', GUID(length=16), nullable=False),
    sa.Column('score', sa.Integer(), nullable=False),
    sa.Column('comment', sa.String(length=2000), nullable=True),
    sa.Column('sa_orm_sentinel', sa.Integer(), nullable=True),
    sa.Column('created_at', DateTimeUTC(timezone=True), nullable=False),
    sa.Column('updated_at', DateTimeUTC(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['consultation_id'], ['consultation.id'], name=op.f('fk_rating_consultation_id_consultation'), ondelete='RESTRICT'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_rating')),
    sa.UniqueConstraint('consultation_id', name=op.f('uq_rating_consultation_id'))
    )
    with op.batch_alter_table('rating', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_rating_specialist_id'), ['specialist_id'], unique=False)

    op.create_table('analysis_order',
    sa.Column('id', GUID(length=16), nullable=False),
    sa.Column('conclusion_id', GUID(length=16), nullable=False),
    sa.Column('patient_id', GUID(length=16), nullable=False),
    sa.Column('name', sa.String(length=300), nullable=False),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('expected_ready_on', sa.Date(), nullable=True),
    sa.Column('sa_orm_sentinel', sa.Integer(), nullable=True),
    sa.Column('created_at', DateTimeUTC(timezone=True), nullable=False),
    sa.Column('updated_at', DateTimeUTC(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['conclusion_id'], ['conclusion.id'], name=op.f('fk_analysis_order_conclusion_id_conclusion'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['patient_id'], ['user_account.id'], name=op.f('fk_analysis_order_patient_id_user_account'), ondelete='RESTRICT'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_analysis_order'))
    )
    with op.batch_alter_table('analysis_order', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_analysis_order_conclusion_id'), ['conclusion_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_analysis_order_patient_id'), ['patient_id'], unique=False)



def downgrade() -> None:
    with op.batch_alter_table('analysis_order', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_analysis_order_patient_id'))
        batch_op.drop_index(batch_op.f('ix_analysis_order_conclusion_id'))

    op.drop_table('analysis_order')
    with op.batch_alter_table('rating', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_rating_specialist_id'))

    op.drop_table('rating')
    with op.batch_alter_table('payment', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_payment_consultation_id'))

    op.drop_table('payment')
    with op.batch_alter_table('conclusion', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_conclusion_patient_id'))

    op.drop_table('conclusion')
    with op.batch_alter_table('consultation', schema=None) as batch_op:
        batch_op.drop_index('uq_consultation_live_slot', postgresql_where=sa.text("status <> 'cancelled'"), sqlite_where=sa.text("status <> 'cancelled'"))
        batch_op.drop_index(batch_op.f('ix_consultation_status'))
        batch_op.drop_index('ix_consultation_specialist_time')
        batch_op.drop_index('ix_consultation_patient_time')

    op.drop_table('consultation')
    with op.batch_alter_table('waitlist_request', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_waitlist_request_status'))
        batch_op.drop_index(batch_op.f('ix_waitlist_request_specialty'))
        batch_op.drop_index(batch_op.f('ix_waitlist_request_patient_id'))

    op.drop_table('waitlist_request')
    with op.batch_alter_table('slot', schema=None) as batch_op:
        batch_op.drop_index('ix_slot_free_by_time')

    op.drop_table('slot')
    op.drop_table('schedule')
    with op.batch_alter_table('outbox_event', schema=None) as batch_op:
        batch_op.drop_index('ix_outbox_event_pending')

    op.drop_table('outbox_event')
    with op.batch_alter_table('clinic_service', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_clinic_service_specialty'))

    op.drop_table('clinic_service')
