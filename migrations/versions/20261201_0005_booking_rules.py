"""Booking rules: who each direction serves, the patient's sex.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-01 21:40:00.000000
"""
from __future__ import annotations

import datetime as dt

import sqlalchemy as sa
from advanced_alchemy.types import GUID, DateTimeUTC
from alembic import op
from uuid_utils.compat import uuid7

revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None

# the clinic's defaults: children's doctors see the under-18s, gynecology serves women
SEED = [("pediatrics", None, 17, None), ("gynecology", None, None, "female")]


def upgrade() -> None:
    rules = op.create_table('specialty_rule',
    sa.Column('id', GUID(length=16), nullable=False),
    sa.Column('specialty', sa.String(length=32), nullable=False),
    sa.Column('min_age', sa.Integer(), nullable=True),
    sa.Column('max_age', sa.Integer(), nullable=True),
    sa.Column('sex', sa.String(length=8), nullable=True),
    sa.Column('sa_orm_sentinel', sa.Integer(), nullable=True),
    sa.Column('created_at', DateTimeUTC(timezone=True), nullable=False),
    sa.Column('updated_at', DateTimeUTC(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_specialty_rule')),
    sa.UniqueConstraint('specialty', name=op.f('uq_specialty_rule_specialty'))
    )
    now = dt.datetime.now(dt.UTC)
    op.bulk_insert(rules, [{"id": uuid7(), "specialty": s, "min_age": lo, "max_age": hi, "sex": sex,
                            "created_at": now, "updated_at": now} for s, lo, hi, sex in SEED])
    with op.batch_alter_table('user_account', schema=None) as batch_op:
        batch_op.add_column(sa.Column('sex', sa.String(length=8), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('user_account', schema=None) as batch_op:
        batch_op.drop_column('sex')
    op.drop_table('specialty_rule')
