"""Documents in object storage, and analyses forwarded from the inbox.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-02 00:00:00.000000
"""
from __future__ import annotations

import sqlalchemy as sa
from advanced_alchemy.types import GUID, DateTimeUTC
from alembic import op
from sqlalchemy.dialects import postgresql

revision = '0007'
down_revision = '0006'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('document',
    sa.Column('id', GUID(length=16), nullable=False),
    sa.Column('patient_id', GUID(length=16), nullable=False),
    sa.Column('kind', sa.String(length=16), nullable=False),
    sa.Column('filename', sa.String(length=255), nullable=False),
    sa.Column('content_type', sa.String(length=100), nullable=False),
    sa.Column('size', sa.BigInteger(), nullable=False),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('reject_reason', sa.String(length=32), nullable=True),
    sa.Column('author_id', GUID(length=16), nullable=False),
    sa.Column('author_role', sa.String(length=32), nullable=False),
    sa.Column('consultation_id', GUID(length=16), nullable=True),
    sa.Column('conversation_id', GUID(length=16), nullable=True),
    sa.Column('storage_key', sa.String(length=200), nullable=False),
    sa.Column('completed_at', DateTimeUTC(timezone=True), nullable=True),
    sa.Column('inbox_status', sa.String(length=16), nullable=True),
    sa.Column('inbox_changed_by', GUID(length=16), nullable=True),
    sa.Column('sa_orm_sentinel', sa.Integer(), nullable=True),
    sa.Column('created_at', DateTimeUTC(timezone=True), nullable=False),
    sa.Column('updated_at', DateTimeUTC(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['author_id'], ['user_account.id'], name=op.f('fk_document_author_id_user_account'), ondelete='RESTRICT'),
    sa.ForeignKeyConstraint(['consultation_id'], ['consultation.id'], name=op.f('fk_document_consultation_id_consultation'), ondelete='SET NULL'),
    sa.ForeignKeyConstraint(['conversation_id'], ['conversation.id'], name=op.f('fk_document_conversation_id_conversation'), ondelete='SET NULL'),
    sa.ForeignKeyConstraint(['patient_id'], ['user_account.id'], name=op.f('fk_document_patient_id_user_account'), ondelete='RESTRICT'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_document')),
    sa.UniqueConstraint('storage_key', name=op.f('uq_document_storage_key'))
    )
    with op.batch_alter_table('document', schema=None) as batch_op:
        batch_op.create_index('ix_document_inbox', ['inbox_status', 'created_at'], unique=False, postgresql_where=sa.text('inbox_status IS NOT NULL'), sqlite_where=sa.text('inbox_status IS NOT NULL'))
        batch_op.create_index('ix_document_patient', ['patient_id', 'created_at'], unique=False)
        batch_op.create_index('ix_document_pending', ['status', 'created_at'], unique=False)

    op.create_table('document_share',
    sa.Column('id', GUID(length=16), nullable=False),
    sa.Column('document_id', GUID(length=16), nullable=False),
    sa.Column('specialist_id', GUID(length=16), nullable=False),
    sa.Column('forwarded_by', GUID(length=16), nullable=False),
    sa.Column('note', sa.String(length=1000), nullable=True),
    sa.Column('sa_orm_sentinel', sa.Integer(), nullable=True),
    sa.Column('created_at', DateTimeUTC(timezone=True), nullable=False),
    sa.Column('updated_at', DateTimeUTC(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['document_id'], ['document.id'], name=op.f('fk_document_share_document_id_document'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['forwarded_by'], ['user_account.id'], name=op.f('fk_document_share_forwarded_by_user_account'), ondelete='RESTRICT'),
    sa.ForeignKeyConstraint(['specialist_id'], ['user_account.id'], name=op.f('fk_document_share_specialist_id_user_account'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_document_share')),
    sa.UniqueConstraint('document_id', 'specialist_id', name=op.f('uq_document_share_document_id'))
    )
    with op.batch_alter_table('document_share', schema=None) as batch_op:
        batch_op.create_index('ix_document_share_specialist', ['specialist_id'], unique=False)

    # a message's attachments as it shows them, so history reads need no join
    with op.batch_alter_table('message', schema=None) as batch_op:
        batch_op.add_column(sa.Column(
            'documents', sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql'),
            nullable=False, server_default='[]'))



def downgrade() -> None:
    with op.batch_alter_table('message', schema=None) as batch_op:
        batch_op.drop_column('documents')

    with op.batch_alter_table('document_share', schema=None) as batch_op:
        batch_op.drop_index('ix_document_share_specialist')

    op.drop_table('document_share')
    with op.batch_alter_table('document', schema=None) as batch_op:
        batch_op.drop_index('ix_document_pending')
        batch_op.drop_index('ix_document_patient')
        batch_op.drop_index('ix_document_inbox', postgresql_where=sa.text('inbox_status IS NOT NULL'), sqlite_where=sa.text('inbox_status IS NOT NULL'))

    op.drop_table('document')
