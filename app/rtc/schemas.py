"""What crosses the wire for calls, their signalling and ICE servers."""

from __future__ import annotations

import datetime as dt
from enum import StrEnum
from typing import Annotated, Literal
from uuid import UUID

from msgspec import Meta

from app.schemas import Out, Wire

# an SDP offer of one audio and one video transceiver is a few KB; far more is no offer of ours
Sdp = Annotated[str, Meta(min_length=1, max_length=65_536)]


class CallState(StrEnum):
    RINGING = "ringing"
    ACTIVE = "active"
    ENDED = "ended"


class EndReason(StrEnum):
    COMPLETED = "completed"  # ended after it was answered
    DECLINED = "declined"  # the patient's side said no
    MISSED = "missed"  # unanswered for CALL_RING_SECONDS
    CANCELLED = "cancelled"  # the specialist hung up while it rang
    FAILED = "failed"  # its SFU node died


class DeliveredVia(StrEnum):
    WEBSOCKET = "websocket"  # a socket in the foreground had it
    PUSH = "push"  # no socket open: only the phone's push rings
    BOTH = "both"  # sockets open, none in the foreground: they ring and the push too
    NONE = "none"  # no socket and no device


class CallStarted(Out):
    id: UUID
    consultation_id: UUID
    state: CallState
    delivered_via: DeliveredVia
    created_at: dt.datetime
    ring_until: dt.datetime


class CallOut(Out):
    id: UUID
    consultation_id: UUID
    state: CallState
    end_reason: EndReason | None
    created_at: dt.datetime
    started_at: dt.datetime | None
    ended_at: dt.datetime | None
    ring_until: dt.datetime
    accepted_by: UUID | None


class MediaIn(Wire):
    audio: bool
    video: bool


class OfferIn(Wire):
    sdp: Sdp
    type: Literal["offer"] = "offer"


class AnswerOut(Out):
    sdp: str
    type: str


class IceServerOut(Out, omit_defaults=True):  # STUN has no username or credential: left out
    urls: list[str]
    username: str | None = None
    credential: str | None = None
