"""Documents: files of a patient kept in object storage, and who they were forwarded to."""

from __future__ import annotations

import datetime as dt
from uuid import UUID

from advanced_alchemy.types import GUID, DateTimeUTC
from sqlalchemy import BigInteger, ForeignKey, Index, String, UniqueConstraint, text
from sqlalchemy.orm import Mapped, mapped_column

from app.db import Base


class Document(Base):
    """One file of one patient. The bytes live in the object store under `storage_key` (generated, never taken
    from a filename); the row says what they are, who wrote them and where they stand."""

    __tablename__ = "document"
    __table_args__ = (
        Index("ix_document_patient", "patient_id", "created_at"),
        # the methodist inbox: analyses by status, oldest first
        Index("ix_document_inbox", "inbox_status", "created_at",
              postgresql_where=text("inbox_status IS NOT NULL"), sqlite_where=text("inbox_status IS NOT NULL")),
        Index("ix_document_pending", "status", "created_at"),
    )

    patient_id: Mapped[UUID] = mapped_column(GUID, ForeignKey("user_account.id", ondelete="RESTRICT"))
    kind: Mapped[str] = mapped_column(String(16))  # analysis | conclusion | referral | image | other
    filename: Mapped[str] = mapped_column(String(255))  # as the uploader named it (cleaned); shown, never a path
    content_type: Mapped[str] = mapped_column(String(100))  # declared at creation; the bytes are checked
    size: Mapped[int] = mapped_column(BigInteger)  # declared at creation; the stored object must match
    status: Mapped[str] = mapped_column(String(16), default="pending")  # pending | ready | rejected
    reject_reason: Mapped[str | None] = mapped_column(String(32))  # too_large, type_mismatch, ... when rejected
    author_id: Mapped[UUID] = mapped_column(GUID, ForeignKey("user_account.id", ondelete="RESTRICT"))
    author_role: Mapped[str] = mapped_column(String(32))  # the role the author uploaded it as
    consultation_id: Mapped[UUID | None] = mapped_column(GUID, ForeignKey("consultation.id", ondelete="SET NULL"))
    conversation_id: Mapped[UUID | None] = mapped_column(GUID, ForeignKey("conversation.id", ondelete="SET NULL"))
    storage_key: Mapped[str] = mapped_column(String(200), unique=True)
    completed_at: Mapped[dt.datetime | None] = mapped_column(DateTimeUTC(timezone=True))
    # analyses only: new -> forwarded -> processed (compare-and-set; null for every other kind)
    inbox_status: Mapped[str | None] = mapped_column(String(16))
    inbox_changed_by: Mapped[UUID | None] = mapped_column(GUID)


class DocumentShare(Base):
    """An analysis forwarded from the inbox to a specialist, who from then on sees it (and its patient's card)."""

    __tablename__ = "document_share"
    __table_args__ = (UniqueConstraint("document_id", "specialist_id"),
                      Index("ix_document_share_specialist", "specialist_id"))

    document_id: Mapped[UUID] = mapped_column(GUID, ForeignKey("document.id", ondelete="CASCADE"))
    specialist_id: Mapped[UUID] = mapped_column(GUID, ForeignKey("user_account.id", ondelete="CASCADE"))
    forwarded_by: Mapped[UUID] = mapped_column(GUID, ForeignKey("user_account.id", ondelete="RESTRICT"))
    note: Mapped[str | None] = mapped_column(String(1000))
