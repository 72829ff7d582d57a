"""Chat: conversations, their writing windows, messages, read marks, and per-user event streams.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-26 01:44:06.000120
"""
from __future__ import annotations

import sqlalchemy as sa
from advanced_alchemy.types import GUID, DateTimeUTC
from alembic import op
from sqlalchemy.dialects import postgresql

revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('user_event',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True, nullable=False),
    sa.Column('recipient_id', GUID(length=16), nullable=False),
    sa.Column('seq', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('type', sa.String(length=64), nullable=False),
    sa.Column('data', sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql'), nullable=False),
    sa.Column('created_at', DateTimeUTC(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_user_event')),
    sa.UniqueConstraint('recipient_id', 'seq', name='uq_user_event_seq')
    )
    op.create_table('user_stream',
    sa.Column('user_id', GUID(length=16), nullable=False),
    sa.Column('last_seq', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.PrimaryKeyConstraint('user_id', name=op.f('pk_user_stream'))
    )
    op.create_table('conversation',
    sa.Column('id', GUID(length=16), nullable=False),
    sa.Column('patient_id', GUID(length=16), nullable=False),
    sa.Column('specialist_id', GUID(length=16), nullable=False),
    sa.Column('extended_until', DateTimeUTC(timezone=True), nullable=True),
    sa.Column('guardian_id', GUID(length=16), nullable=True),
    sa.Column('patient_has_login', sa.Boolean(), server_default=sa.true(), nullable=False),
    sa.Column('sa_orm_sentinel', sa.Integer(), nullable=True),
    sa.Column('created_at', DateTimeUTC(timezone=True), nullable=False),
    sa.Column('updated_at', DateTimeUTC(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['patient_id'], ['user_account.id'], name=op.f('fk_conversation_patient_id_user_account'), ondelete='RESTRICT'),
    sa.ForeignKeyConstraint(['specialist_id'], ['user_account.id'], name=op.f('fk_conversation_specialist_id_user_account'), ondelete='RESTRICT'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_conversation')),
    sa.UniqueConstraint('patient_id', 'specialist_id', name='uq_conversation_pair')
    )
    with op.batch_alter_table('conversation', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_conversation_specialist_id'), ['specialist_id'], unique=False)

    op.create_table('chat_window',
    sa.Column('id', GUID(length=16), nullable=False),
    sa.Column('conversation_id', GUID(length=16), nullable=False),
    sa.Column('consultation_id', GUID(length=16), nullable=False),
    sa.Column('ends_at', DateTimeUTC(timezone=True), nullable=False),
    sa.Column('sa_orm_sentinel', sa.Integer(), nullable=True),
    sa.Column('created_at', DateTimeUTC(timezone=True), nullable=False),
    sa.Column('updated_at', DateTimeUTC(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['conversation_id'], ['conversation.id'], name=op.f('fk_chat_window_conversation_id_conversation'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_chat_window')),
    sa.UniqueConstraint('consultation_id', name='uq_chat_window_consultation')
    )
    with op.batch_alter_table('chat_window', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_chat_window_conversation_id'), ['conversation_id'], unique=False)

    op.create_table('message',
    sa.Column('id', GUID(length=16), nullable=False),
    sa.Column('conversation_id', GUID(length=16), nullable=False),
    sa.Column('author_id', GUID(length=16), nullable=True),
    sa.Column('kind', sa.String(length=16), nullable=False),
    sa.Column('text', sa.Text(), nullable=False),
    sa.Column('document_ids', sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql'), nullable=False),
    sa.Column('client_id', sa.String(length=64), nullable=False),
    sa.Column('edited_at', DateTimeUTC(timezone=True), nullable=True),
    sa.Column('deleted_at', DateTimeUTC(timezone=True), nullable=True),
    sa.Column('sa_orm_sentinel', sa.Integer(), nullable=True),
    sa.Column('created_at', DateTimeUTC(timezone=True), nullable=False),
    sa.Column('updated_at', DateTimeUTC(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['conversation_id'], ['conversation.id'], name=op.f('fk_message_conversation_id_conversation'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_message')),
    sa.UniqueConstraint('conversation_id', 'author_id', 'client_id', name='uq_message_client_id')
    )
    with op.batch_alter_table('message', schema=None) as batch_op:
        batch_op.create_index('ix_message_conversation_id_id', ['conversation_id', 'id'], unique=False)

    op.create_table('read_mark',
    sa.Column('id', GUID(length=16), nullable=False),
    sa.Column('conversation_id', GUID(length=16), nullable=False),
    sa.Column('user_id', GUID(length=16), nullable=False),
    sa.Column('last_read_id', GUID(length=16), nullable=False),
    sa.Column('sa_orm_sentinel', sa.Integer(), nullable=True),
    sa.Column('created_at', DateTimeUTC(timezone=True), nullable=False),
    sa.Column('updated_at', DateTimeUTC(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['conversation_id'], ['conversation.id'], name=op.f('fk_read_mark_conversation_id_conversation'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_read_mark')),
    sa.UniqueConstraint('conversation_id', 'user_id', name='uq_read_mark')
    )


def downgrade() -> None:
    op.drop_table('read_mark')
    with op.batch_alter_table('message', schema=None) as batch_op:
        batch_op.drop_index('ix_message_conversation_id_id')

    op.drop_table('message')
    with op.batch_alter_table('chat_window', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_chat_window_conversation_id'))

    op.drop_table('chat_window')
    with op.batch_alter_table('conversation', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_conversation_specialist_id'))

    op.drop_table('conversation')
    op.drop_table('user_stream')
    op.drop_table('user_event')
