"""Thin HTTP handlers for calls, their media signalling and ICE servers; the socket's `rtc.offer` and
`rtc.candidate` handlers."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from enum import StrEnum
from typing import Annotated, Any
from uuid import UUID

import msgspec
from litestar import Controller, Request, get, post
from litestar.datastructures import State
from litestar.di import NamedDependency, Provide
from litestar.params import FromPath, FromQuery, JSONBody, Parameter
from sqlalchemy.ext.asyncio import AsyncSession

from app import params
from app.access import Viewer
from app.accounts.controllers import parse_cursor
from app.chat.gateway import SocketRoute
from app.errors import DomainError, Invalid, NotVisible, TooMany
from app.rtc.models import Call
from app.rtc.schemas import AnswerOut, CallOut, CallStarted, CallState, IceServerOut, MediaIn, OfferIn
from app.rtc.service import CallService
from app.rtc.turn import ice_servers
from app.schemas import Page
from app.services import calls_for

log = logging.getLogger("app.rtc")


async def provide_calls(db_session: NamedDependency[AsyncSession], state: State) -> CallService:
    return calls_for(db_session, state)


class CandidateIn(msgspec.Struct, forbid_unknown_fields=True):
    """A trickled ICE candidate: its SDP line ("candidate:…"), or null once the client has no more."""

    candidate: str | None = None


MAX_CANDIDATE_CHARS = 1024  # one SDP candidate line is a few hundred characters


async def offer_allowed(state: State, viewer: Viewer) -> None:
    """Each offer costs the SFU a peer connection and its ports: RTC_OFFERS_PER_MINUTE per user (socket and REST
    together), 429 `too_many_offers` beyond."""
    wait = await state.limiter.hit(f"rtc:offer:{viewer.id}", state.settings.rtc_offers_per_minute, 60)
    if wait:
        raise TooMany("too many offers; wait before offering again", wait, "too_many_offers")


def checked_candidate(candidate: str | None) -> str | None:
    if candidate is not None and len(candidate) > MAX_CANDIDATE_CHARS:
        raise Invalid("the ICE candidate is too long", "invalid_candidate")
    return candidate


def call_out(call: Call) -> CallOut:
    return CallOut(id=call.id, consultation_id=call.consultation_id, state=call.state,  # type: ignore[arg-type]
                   end_reason=call.end_reason, created_at=call.created_at,  # type: ignore[arg-type]
                   started_at=call.started_at, ended_at=call.ended_at, ring_until=call.ring_deadline,
                   accepted_by=call.accepted_by)


class StartController(Controller):
    path = "/api/v1/consultations"
    tags = ["calls"]
    dependencies = {"calls": Provide(provide_calls)}

    @post("/{consultation_id:uuid}/calls", status_code=201)
    async def start_call(self, request: Request[Viewer, Any, Any], calls: NamedDependency[CallService],
                         consultation_id: FromPath[UUID]) -> CallStarted:
        """The consultation's specialist calls the patient: it rings in the app, and by push when not shown."""
        started = await calls.start(request.user, consultation_id)
        c = started.call
        return CallStarted(id=c.id, consultation_id=c.consultation_id, state=c.state,  # type: ignore[arg-type]
                           delivered_via=started.delivered_via, created_at=c.created_at, ring_until=c.ring_deadline)


class CallListStatus(StrEnum):
    LIVE = "live"  # ringing or active


class CallController(Controller):
    path = "/api/v1/calls"
    tags = ["calls"]
    dependencies = {"calls": Provide(provide_calls)}

    @get("/")
    async def list_calls(self, request: Request[Viewer, Any, Any], calls: NamedDependency[CallService],
                         status: FromQuery[CallListStatus] = CallListStatus.LIVE,
                         limit: FromQuery[Annotated[int, Parameter(ge=1, le=100)]] = 20,
                         cursor: params.Cursor = None) -> Page[CallOut]:
        """The caller's live calls (ringing or active; `status=live`), newest first: the consultations they are
        the patient, a dependent's guardian or the specialist of. A page opened after a call started rings."""
        rows = await calls.live_of(request.user, limit, parse_cursor(cursor))
        return Page(items=[call_out(c) for c in rows[:limit]],
                    next_cursor=str(rows[limit - 1].id) if len(rows) > limit else None)

    @get("/{call_id:uuid}")
    async def get_call(self, request: Request[Viewer, Any, Any], calls: NamedDependency[CallService],
                       call_id: FromPath[UUID]) -> CallOut:
        return call_out(await calls.get(request.user, call_id))

    @post("/{call_id:uuid}/accept", status_code=200)
    async def accept_call(self, request: Request[Viewer, Any, Any], calls: NamedDependency[CallService],
                          call_id: FromPath[UUID]) -> CallOut:
        return call_out(await calls.accept(request.user, call_id))

    @post("/{call_id:uuid}/decline", status_code=200)
    async def decline_call(self, request: Request[Viewer, Any, Any], calls: NamedDependency[CallService],
                           call_id: FromPath[UUID]) -> CallOut:
        return call_out(await calls.decline(request.user, call_id))

    @post("/{call_id:uuid}/end", status_code=200)
    async def end_call(self, request: Request[Viewer, Any, Any], calls: NamedDependency[CallService],
                       call_id: FromPath[UUID]) -> CallOut:
        return call_out(await calls.end(request.user, call_id))

    @post("/{call_id:uuid}/media", status_code=200)
    async def set_media(self, request: Request[Viewer, Any, Any], calls: NamedDependency[CallService],
                        call_id: FromPath[UUID], data: JSONBody[MediaIn]) -> CallOut:
        return call_out(await calls.media(request.user, call_id, data.audio, data.video))

    @post("/{call_id:uuid}/rtc/offer", status_code=200)
    async def offer_media(self, request: Request[Viewer, Any, Any], calls: NamedDependency[CallService],
                          call_id: FromPath[UUID], data: JSONBody[OfferIn]) -> AnswerOut:
        """One RTCPeerConnection per participant to the SFU: the offer's answer (sendrecv audio and video)."""
        await offer_allowed(request.app.state, request.user)
        sdp, type_ = await calls.offer(request.user, call_id, data.sdp, data.type)
        return AnswerOut(sdp=sdp, type=type_)

    @post("/{call_id:uuid}/rtc/candidate", status_code=204)
    async def trickle_candidate(self, request: Request[Viewer, Any, Any], calls: NamedDependency[CallService],
                                call_id: FromPath[UUID], data: JSONBody[CandidateIn]) -> None:
        """A trickled ICE candidate for the viewer's current peer connection (the socket's `rtc.candidate`)."""
        await calls.candidate(request.user, call_id, checked_candidate(data.candidate))


@get("/api/v1/rtc/ice-servers", tags=["calls"], dependencies={"calls": Provide(provide_calls)})
async def list_ice_servers(request: Request[Viewer, Any, Any], state: State, calls: NamedDependency[CallService],
                           call_id: FromQuery[UUID | None] = None) -> list[IceServerOut]:
    """STUN, and for a participant of the live call `call_id` TURN too; TURN credentials expire (coturn's REST
    scheme). Without a call, or for one not theirs or ended: STUN only."""
    relay = False
    if call_id is not None:
        try:
            call = await calls.get(request.user, call_id)
        except NotVisible:
            call = None
        viewer = request.user.id
        relay = call is not None and call.state != CallState.ENDED and (
            call.accepted_by is None or viewer in (call.accepted_by, call.specialist_id))
    return [IceServerOut(urls=s.urls, username=s.username, credential=s.credential)
            for s in ice_servers(state.settings, request.user.id, relay=relay)]


# --- the realtime socket's signalling messages (app/chat/gateway.py hands them here) -------------------


class SocketOffer(msgspec.Struct, forbid_unknown_fields=True):
    call_id: UUID
    sdp: str
    type: str = "offer"


class SocketCandidate(msgspec.Struct, forbid_unknown_fields=True):
    call_id: UUID
    candidate: str | None = None


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
        await offer_allowed(state, viewer)
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
    """`rtc.candidate` `{call_id, candidate: "<SDP line>" | null}`: a trickling client's candidate, for the SFU to
    check (the SFU's own are all in its answer). Nothing comes back unless it is refused (an error frame)."""
    try:
        given = msgspec.convert(data, SocketCandidate)
        line = checked_candidate(given.candidate)
    except msgspec.ValidationError:
        return _error("invalid_candidate", data.get("call_id") if isinstance(data.get("call_id"), str) else None)
    except DomainError as exc:
        return _error(str(exc.extra.get("reason", "refused")), str(data.get("call_id")))
    try:
        async with state.database.reader() as session:
            await calls_for(session, state).candidate(viewer, given.call_id, line)
    except DomainError as exc:
        return _error(str(exc.extra.get("reason", "refused")), str(given.call_id))
    except Exception:
        log.exception("a socket candidate failed", extra={"call_id": str(given.call_id)})
        return _error("sfu_unavailable", str(given.call_id))
    return None


# the socket's signalling: one message at a time per socket, in order; a second offer while one is in flight is
# refused (`offer_in_progress`), candidates wait behind their offer
SOCKET_HANDLERS: dict[str, SocketRoute] = {
    "rtc.offer": SocketRoute(socket_offer, busy_reason="offer_in_progress"),
    "rtc.candidate": SocketRoute(socket_candidate),
}
