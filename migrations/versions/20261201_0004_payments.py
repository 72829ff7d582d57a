"""Payments through a provider: payment attempts, refunds due.

The desk's payment rows gain a status and the provider's id; one successful payment per consultation
becomes the database's rule (earlier extra payments of one visit are kept, marked duplicate; payments the
rules refuse, recorded by the visit's patient or guardian or not for the service's price, are marked void and
no longer make a visit paid).

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01 21:40:00.000000
"""
from __future__ import annotations

import sqlalchemy as sa
from advanced_alchemy.types import GUID, DateTimeUTC
from alembic import op

revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None

SUCCEEDED = sa.text("status = 'succeeded'")
PENDING = sa.text("status = 'pending'")


def upgrade() -> None:
    with op.batch_alter_table('payment', schema=None) as batch_op:
        batch_op.add_column(sa.Column('currency', sa.String(length=3), nullable=False, server_default='RUB'))
        batch_op.add_column(sa.Column('status', sa.String(length=16), nullable=False, server_default='succeeded'))
        batch_op.add_column(sa.Column('provider', sa.String(length=32), nullable=True))
        batch_op.add_column(sa.Column('provider_payment_id', sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column('confirmation_url', sa.String(length=2000), nullable=True))
        batch_op.create_unique_constraint(batch_op.f('uq_payment_provider_payment_id'), ['provider_payment_id'])
    # a payment the rules refuse counts for nothing: recorded by the visit's own patient (or their guardian),
    # or not for the service's price
    op.execute(
        "UPDATE payment SET status = 'void' WHERE EXISTS (SELECT 1 FROM consultation "
        "JOIN clinic_service ON clinic_service.id = consultation.service_id "
        "JOIN user_account AS patient ON patient.id = consultation.patient_id "
        "WHERE consultation.id = payment.consultation_id AND (payment.recorded_by = consultation.patient_id "
        "OR payment.recorded_by = patient.guardian_id OR payment.amount <> clinic_service.price))")
    # a visit paid more than once before the rule: the first valid payment stands, the others are marked
    op.execute(
        "UPDATE payment SET status = 'duplicate' WHERE status = 'succeeded' AND EXISTS (SELECT 1 FROM payment "
        "AS earlier WHERE earlier.status = 'succeeded' AND earlier.consultation_id = payment.consultation_id "
        "AND (earlier.created_at < payment.created_at "
        "OR (earlier.created_at = payment.created_at AND earlier.reference < payment.reference)))")
    # a visit is paid exactly when a valid payment stands for it
    paid = ("EXISTS (SELECT 1 FROM payment WHERE payment.consultation_id = consultation.id "
            "AND payment.status = 'succeeded')")
    op.execute(f"UPDATE consultation SET paid = {paid} WHERE paid <> {paid}")
    with op.batch_alter_table('payment', schema=None) as batch_op:
        batch_op.create_index('uq_payment_succeeded', ['consultation_id'], unique=True,
                              postgresql_where=SUCCEEDED, sqlite_where=SUCCEEDED)
        batch_op.create_index('uq_payment_pending', ['consultation_id'], unique=True,
                              postgresql_where=PENDING, sqlite_where=PENDING)

    op.create_table('refund',
    sa.Column('id', GUID(length=16), nullable=False),
    sa.Column('consultation_id', GUID(length=16), nullable=False),
    sa.Column('payment_id', GUID(length=16), nullable=False),
    sa.Column('amount', sa.Numeric(precision=10, scale=2), nullable=False),
    sa.Column('currency', sa.String(length=3), nullable=False),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('provider', sa.String(length=32), nullable=True),
    sa.Column('provider_refund_id', sa.String(length=64), nullable=True),
    sa.Column('attempts', sa.Integer(), nullable=False),
    sa.Column('next_attempt_at', DateTimeUTC(timezone=True), nullable=True),
    sa.Column('last_error', sa.String(length=300), nullable=True),
    sa.Column('resolved_by', GUID(length=16), nullable=True),
    sa.Column('resolved_at', DateTimeUTC(timezone=True), nullable=True),
    sa.Column('sa_orm_sentinel', sa.Integer(), nullable=True),
    sa.Column('created_at', DateTimeUTC(timezone=True), nullable=False),
    sa.Column('updated_at', DateTimeUTC(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['consultation_id'], ['consultation.id'],
                            name=op.f('fk_refund_consultation_id_consultation'), ondelete='RESTRICT'),
    sa.ForeignKeyConstraint(['payment_id'], ['payment.id'], name=op.f('fk_refund_payment_id_payment'),
                            ondelete='RESTRICT'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_refund')),
    sa.UniqueConstraint('payment_id', name=op.f('uq_refund_payment_id'))
    )
    with op.batch_alter_table('refund', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_refund_consultation_id'), ['consultation_id'], unique=False)
        batch_op.create_index('ix_refund_status_next', ['status', 'next_attempt_at'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('refund', schema=None) as batch_op:
        batch_op.drop_index('ix_refund_status_next')
        batch_op.drop_index(batch_op.f('ix_refund_consultation_id'))
    op.drop_table('refund')
    with op.batch_alter_table('payment', schema=None) as batch_op:
        batch_op.drop_index('uq_payment_pending', postgresql_where=PENDING, sqlite_where=PENDING)
        batch_op.drop_index('uq_payment_succeeded', postgresql_where=SUCCEEDED, sqlite_where=SUCCEEDED)
        batch_op.drop_constraint(batch_op.f('uq_payment_provider_payment_id'), type_='unique')
        batch_op.drop_column('confirmation_url')
        batch_op.drop_column('provider_payment_id')
        batch_op.drop_column('provider')
        batch_op.drop_column('status')
        batch_op.drop_column('currency')
