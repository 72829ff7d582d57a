"""Thin HTTP handlers for calls, their media signalling and ICE servers; the socket's `rtc.offer` handler."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any
from uuid import UUID

import msgspec
from litestar import Controller, Request, get, post
from litestar.datastructures import State
from litestar.di import NamedDependency, Provide
from litestar.params import FromPath, JSONBody
from sqlalchemy.ext.asyncio import AsyncSession

from app.access import Viewer, signed_in
from app.errors import DomainError
from app.rtc.models import Call
from app.rtc.schemas import AnswerOut, CallOut, CallStarted, IceServerOut, MediaIn, OfferIn
from app.rtc.service import CallService
from app.rtc.turn import ice_servers
from app.services import calls_for

log = logging.getLogger("app.rtc")


async def provide_calls(db_session: NamedDependency[AsyncSession], state: State) -> CallService:
    return calls_for(db_session, state)


def call_out(call: Call) -> CallOut:
    return CallOut(id=call.id, consultation_id=call.consultation_id, state=call.state,  # type: ignore[arg-type]
                   end_reason=call.end_reason, created_at=call.created_at,  # type: ignore[arg-type]
                   started_at=call.started_at, ended_at=call.ended_at, ring_until=call.ring_deadline,
                   accepted_by=call.accepted_by)


class StartController(Controller):
    path = "/api/v1/consultations"
    tags = ["calls"]
    dependencies = {"calls": Provide(provide_calls)}

    @post("/{consultation_id:uuid}/calls", status_code=201, guards=[signed_in])
    async def start_call(self, request: Request[Viewer, Any, Any], calls: NamedDependency[CallService],
                         consultation_id: FromPath[UUID]) -> CallStarted:
        """The consultation's specialist calls the patient: it rings in the app, and by push when not shown."""
        started = await calls.start(request.user, consultation_id)
        c = started.call
        return CallStarted(id=c.id, consultation_id=c.consultation_id, state=c.state,  # type: ignore[arg-type]
                           delivered_via=started.delivered_via, created_at=c.created_at, ring_until=c.ring_deadline)


class CallController(Controller):
    path = "/api/v1/calls"
    tags = ["calls"]
    dependencies = {"calls": Provide(provide_calls)}

    @get("/{call_id:uuid}", guards=[signed_in])
    async def get_call(self, request: Request[Viewer, Any, Any], calls: NamedDependency[CallService],
                       call_id: FromPath[UUID]) -> CallOut:
        return call_out(await calls.get(request.user, call_id))

    @post("/{call_id:uuid}/accept", status_code=200, guards=[signed_in])
    async def accept_call(self, request: Request[Viewer, Any, Any], calls: NamedDependency[CallService],
                          call_id: FromPath[UUID]) -> CallOut:
        return call_out(await calls.accept(request.user, call_id))

    @post("/{call_id:uuid}/decline", status_code=200, guards=[signed_in])
    async def decline_call(self, request: Request[Viewer, Any, Any], calls: NamedDependency[CallService],
                           call_id: FromPath[UUID]) -> CallOut:
        return call_out(await calls.decline(request.user, call_id))

    @post("/{call_id:uuid}/end", status_code=200, guards=[signed_in])
    async def end_call(self, request: Request[Viewer, Any, Any], calls: NamedDependency[CallService],
                       call_id: FromPath[UUID]) -> CallOut:
        return call_out(await calls.end(request.user, call_id))

    @post("/{call_id:uuid}/media", status_code=200, guards=[signed_in])
    async def set_media(self, request: Request[Viewer, Any, Any], calls: NamedDependency[CallService],
                        call_id: FromPath[UUID], data: JSONBody[MediaIn]) -> CallOut:
        return call_out(await calls.media(request.user, call_id, data.audio, data.video))

    @post("/{call_id:uuid}/rtc/offer", status_code=200, guards=[signed_in])
    async def offer_media(self, request: Request[Viewer, Any, Any], calls: NamedDependency[CallService],
                          call_id: FromPath[UUID], data: JSONBody[OfferIn]) -> AnswerOut:
        """One RTCPeerConnection per participant to the SFU: the offer's answer (sendrecv audio and video)."""
        sdp, type_ = await calls.offer(request.user, call_id, data.sdp, data.type)
        return AnswerOut(sdp=sdp, type=type_)


@get("/api/v1/rtc/ice-servers", guards=[signed_in], tags=["calls"])
async def list_ice_servers(request: Request[Viewer, Any, Any], state: State) -> list[IceServerOut]:
    """STUN and TURN for a call's peer connection; TURN credentials expire (coturn's REST scheme)."""
    return [IceServerOut(urls=s.urls, username=s.username, credential=s.credential)
            for s in ice_servers(state.settings, request.user.id)]


# --- the realtime socket's signalling messages (app/chat/gateway.py hands them here) -------------------


class SocketOffer(msgspec.Struct, forbid_unknown_fields=True):
    call_id: UUID
    sdp: str
    type: str = "offer"


SocketHandler = Callable[[State, Viewer, dict[str, Any]], Awaitable[str | None]]


def _error(reason: str, call_id: Any = None) -> str:
    return msgspec.json.encode({"type": "error", "data": {"reason": reason, "call_id": call_id}}).decode()


async def socket_offer(state: State, viewer: Viewer, data: dict[str, Any]) -> str | None:
    """`rtc.offer` `{call_id, sdp, type}` → `rtc.answer` `{call_id, sdp, type}` on that socket, or an error frame
    naming the reason (the same rules as POST /api/v1/calls/{id}/rtc/offer)."""
    try:
        offer = msgspec.convert(data, SocketOffer)
        if offer.type != "offer" or not offer.sdp or len(offer.sdp) > 65_536:
            return _error("invalid_offer", str(offer.call_id))
    except msgspec.ValidationError:
        return _error("invalid_offer", data.get("call_id") if isinstance(data.get("call_id"), str) else None)
    try:
        async with state.database.reader() as session:
            sdp, type_ = await calls_for(session, state).offer(viewer, offer.call_id, offer.sdp, offer.type)
    except DomainError as exc:
        return _error(str(exc.extra.get("reason", "refused")), str(offer.call_id))
    except Exception:
        log.exception("a socket offer failed", extra={"call_id": str(offer.call_id)})
        return _error("sfu_unavailable", str(offer.call_id))
    return msgspec.json.encode({"type": "rtc.answer",
                                "data": {"call_id": str(offer.call_id), "sdp": sdp, "type": type_}}).decode()


async def socket_candidate(state: State, viewer: Viewer, data: dict[str, Any]) -> str | None:
    """`rtc.candidate` is accepted and ignored: the SFU (aiortc) gathers all its candidates before it answers (they
    are in the answer), and learns a client's from its offer or from the client's connectivity checks reaching it
    (peer-reflexive), so nothing needs to trickle."""
    return None


SOCKET_HANDLERS: dict[str, SocketHandler] = {"rtc.offer": socket_offer, "rtc.candidate": socket_candidate}
