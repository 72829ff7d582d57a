"""Accounts: users (patients, dependents, staff), one-time codes, refresh tokens, devices.

Revision ID: 0001
Revises:
Create Date: 2026-11-26 01:14:28.983870
"""
from __future__ import annotations

import sqlalchemy as sa
from advanced_alchemy.types import GUID, DateTimeUTC
from alembic import op
from sqlalchemy.dialects import postgresql

revision = '0001'
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('otp_code',
    sa.Column('id', GUID(length=16), nullable=False),
    sa.Column('phone', sa.String(length=16), nullable=False),
    sa.Column('code_hash', sa.String(length=64), nullable=False),
    sa.Column('expires_at', DateTimeUTC(timezone=True), nullable=False),
    sa.Column('attempts', sa.Integer(), nullable=False),
    sa.Column('sa_orm_sentinel', sa.Integer(), nullable=True),
    sa.Column('created_at', DateTimeUTC(timezone=True), nullable=False),
    sa.Column('updated_at', DateTimeUTC(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_otp_code')),
    sa.UniqueConstraint('phone', name=op.f('uq_otp_code_phone'))
    )
    op.create_table('user_account',
    sa.Column('id', GUID(length=16), nullable=False),
    sa.Column('phone', sa.String(length=16), nullable=True),
    sa.Column('full_name', sa.String(length=200), nullable=False),
    sa.Column('birth_date', sa.Date(), nullable=True),
    sa.Column('timezone', sa.String(length=64), nullable=False),
    sa.Column('roles', sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql'), nullable=False),
    sa.Column('specialties', sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql'), nullable=False),
    sa.Column('is_staff', sa.Boolean(), nullable=False),
    sa.Column('questionnaire', sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql'), nullable=False),
    sa.Column('guardian_id', GUID(length=16), nullable=True),
    sa.Column('relation', sa.String(length=32), nullable=True),
    sa.Column('legal_basis', sa.String(length=500), nullable=True),
    sa.Column('sa_orm_sentinel', sa.Integer(), nullable=True),
    sa.Column('created_at', DateTimeUTC(timezone=True), nullable=False),
    sa.Column('updated_at', DateTimeUTC(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['guardian_id'], ['user_account.id'], name=op.f('fk_user_account_guardian_id_user_account'), ondelete='RESTRICT'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_user_account')),
    sa.UniqueConstraint('phone', name=op.f('uq_user_account_phone'))
    )
    with op.batch_alter_table('user_account', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_user_account_guardian_id'), ['guardian_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_user_account_is_staff'), ['is_staff'], unique=False)

    op.create_table('device',
    sa.Column('id', GUID(length=16), nullable=False),
    sa.Column('user_id', GUID(length=16), nullable=False),
    sa.Column('platform', sa.String(length=16), nullable=False),
    sa.Column('push_token', sa.String(length=4096), nullable=False),
    sa.Column('push_token_hash', sa.String(length=64), nullable=False),
    sa.Column('voip_token', sa.String(length=4096), nullable=True),
    sa.Column('sa_orm_sentinel', sa.Integer(), nullable=True),
    sa.Column('created_at', DateTimeUTC(timezone=True), nullable=False),
    sa.Column('updated_at', DateTimeUTC(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['user_id'], ['user_account.id'], name=op.f('fk_device_user_id_user_account'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_device')),
    sa.UniqueConstraint('push_token_hash', name=op.f('uq_device_push_token_hash'))
    )
    with op.batch_alter_table('device', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_device_user_id'), ['user_id'], unique=False)

    op.create_table('refresh_token',
    sa.Column('id', GUID(length=16), nullable=False),
    sa.Column('user_id', GUID(length=16), nullable=False),
    sa.Column('family_id', GUID(length=16), nullable=False),
    sa.Column('token_hash', sa.String(length=64), nullable=False),
    sa.Column('expires_at', DateTimeUTC(timezone=True), nullable=False),
    sa.Column('used_at', DateTimeUTC(timezone=True), nullable=True),
    sa.Column('revoked_at', DateTimeUTC(timezone=True), nullable=True),
    sa.Column('sa_orm_sentinel', sa.Integer(), nullable=True),
    sa.Column('created_at', DateTimeUTC(timezone=True), nullable=False),
    sa.Column('updated_at', DateTimeUTC(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['user_id'], ['user_account.id'], name=op.f('fk_refresh_token_user_id_user_account'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_refresh_token')),
    sa.UniqueConstraint('token_hash', name=op.f('uq_refresh_token_token_hash'))
    )
    with op.batch_alter_table('refresh_token', schema=None) as batch_op:
        batch_op.create_index('ix_refresh_token_family', ['family_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_refresh_token_user_id'), ['user_id'], unique=False)

def downgrade() -> None:
    with op.batch_alter_table('refresh_token', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_refresh_token_user_id'))
        batch_op.drop_index('ix_refresh_token_family')

    op.drop_table('refresh_token')
    with op.batch_alter_table('device', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_device_user_id'))

    op.drop_table('device')
    with op.batch_alter_table('user_account', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_user_account_is_staff'))
        batch_op.drop_index(batch_op.f('ix_user_account_guardian_id'))

    op.drop_table('user_account')
    op.drop_table('otp_code')
