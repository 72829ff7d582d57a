"""Access that ends at once: deactivated accounts, revoked logins.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-01 21:40:00.000000
"""
from __future__ import annotations

import sqlalchemy as sa
from advanced_alchemy.types import GUID, DateTimeUTC
from alembic import op

revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('user_account', schema=None) as batch_op:
        batch_op.add_column(sa.Column('active', sa.Boolean(), nullable=False, server_default=sa.true()))
    op.create_table('access_revocation',
    sa.Column('id', GUID(length=16), nullable=False),
    sa.Column('user_id', GUID(length=16), nullable=False),
    sa.Column('family_id', GUID(length=16), nullable=True),
    sa.Column('not_before', DateTimeUTC(timezone=True), nullable=False),
    sa.Column('sa_orm_sentinel', sa.Integer(), nullable=True),
    sa.Column('created_at', DateTimeUTC(timezone=True), nullable=False),
    sa.Column('updated_at', DateTimeUTC(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['user_id'], ['user_account.id'], name=op.f('fk_access_revocation_user_id_user_account'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_access_revocation'))
    )
    with op.batch_alter_table('access_revocation', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_access_revocation_not_before'), ['not_before'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('access_revocation', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_access_revocation_not_before'))
    op.drop_table('access_revocation')
    with op.batch_alter_table('user_account', schema=None) as batch_op:
        batch_op.drop_column('active')
