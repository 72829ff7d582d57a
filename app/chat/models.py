"""Chat: one conversation per patient and specialist, its messages, read marks, and per-user event streams."""

from __future__ import annotations

import datetime as dt
from typing import Any
from uuid import UUID

from advanced_alchemy.types import GUID, DateTimeUTC
from sqlalchemy import BigInteger, Boolean, ForeignKey, Index, Integer, String, Text, UniqueConstraint, true
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from app.db import Base, JsonDoc, metadata


class Conversation(Base):
    __tablename__ = "conversation"
    __table_args__ = (UniqueConstraint("patient_id", "specialist_id", name="uq_conversation_pair"),)

    patient_id: Mapped[UUID] = mapped_column(GUID, ForeignKey("user_account.id", ondelete="RESTRICT"))
    specialist_id: Mapped[UUID] = mapped_column(GUID, ForeignKey("user_account.id", ondelete="RESTRICT"),
                                                index=True)
    extended_until: Mapped[dt.datetime | None] = mapped_column(DateTimeUTC(timezone=True))
    # who besides the specialist sees it, fixed when it is made so a send needs no account lookups:
    # the patient when they have a login (a dependent has none) and a dependent's guardian
    guardian_id: Mapped[UUID | None] = mapped_column(GUID)
    patient_has_login: Mapped[bool] = mapped_column(Boolean, default=True, server_default=true())


class ChatWindow(Base):
    """A consultation holding its conversation open for writing; removed when the consultation ends."""

    __tablename__ = "chat_window"
    __table_args__ = (UniqueConstraint("consultation_id", name="uq_chat_window_consultation"),)

    conversation_id: Mapped[UUID] = mapped_column(GUID, ForeignKey("conversation.id", ondelete="CASCADE"),
                                                  index=True)
    consultation_id: Mapped[UUID] = mapped_column(GUID)
    ends_at: Mapped[dt.datetime] = mapped_column(DateTimeUTC(timezone=True))  # the visit's planned end


class Message(Base):
    __tablename__ = "message"
    __table_args__ = (
        # a retried send finds its first copy here instead of writing a second one
        UniqueConstraint("conversation_id", "author_id", "client_id", name="uq_message_client_id"),
        Index("ix_message_conversation_id_id", "conversation_id", "id"),
    )

    conversation_id: Mapped[UUID] = mapped_column(GUID, ForeignKey("conversation.id", ondelete="CASCADE"))
    author_id: Mapped[UUID | None] = mapped_column(GUID)  # None: the system
    kind: Mapped[str] = mapped_column(String(16), default="text")  # text | system
    text: Mapped[str] = mapped_column(Text, default="")
    document_ids: Mapped[list[str]] = mapped_column(JsonDoc, default=list)
    # the attached documents as the message shows them ({id, filename, content_type, size, kind}), kept on the
    # row so reading history needs no join
    documents: Mapped[list[dict[str, Any]]] = mapped_column(JsonDoc, default=list, server_default="[]")
    client_id: Mapped[str] = mapped_column(String(64))
    edited_at: Mapped[dt.datetime | None] = mapped_column(DateTimeUTC(timezone=True))
    deleted_at: Mapped[dt.datetime | None] = mapped_column(DateTimeUTC(timezone=True))  # text and files gone


class ReadMark(Base):
    """How far a user has read a conversation."""

    __tablename__ = "read_mark"
    __table_args__ = (UniqueConstraint("conversation_id", "user_id", name="uq_read_mark"),)

    conversation_id: Mapped[UUID] = mapped_column(GUID, ForeignKey("conversation.id", ondelete="CASCADE"))
    user_id: Mapped[UUID] = mapped_column(GUID)
    last_read_id: Mapped[UUID] = mapped_column(GUID)


class _Plain(DeclarativeBase):
    """Tables keyed by a number, not a UUID: the event streams."""

    metadata = metadata


class UserStream(_Plain):
    """The last position handed out in a user's event stream; its row lock orders that user's events."""

    __tablename__ = "user_stream"

    user_id: Mapped[UUID] = mapped_column(GUID, primary_key=True)
    last_seq: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), default=0)


class UserEvent(_Plain):
    """One event in one user's stream, written in the transaction of the change it announces."""

    __tablename__ = "user_event"
    __table_args__ = (UniqueConstraint("recipient_id", "seq", name="uq_user_event_seq"),)

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True,
                                    autoincrement=True)
    recipient_id: Mapped[UUID] = mapped_column(GUID)
    seq: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"))
    type: Mapped[str] = mapped_column(String(64))
    data: Mapped[dict[str, Any]] = mapped_column(JsonDoc)
    created_at: Mapped[dt.datetime] = mapped_column(DateTimeUTC(timezone=True))
