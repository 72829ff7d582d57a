"""The forwarding engine: rooms of two participants, each with one RTCPeerConnection to us.

INTERFACE: `Sfu`, `SfuLoad`, `RoomFull` keep these names and signatures (add freely); the API's call service (in
process) and the SFU node's control server (`app/rtc/sfu/node.py`) both drive it.

Negotiation (API.md "Calls"): each participant offers audio and video, sendrecv; the answer is sendrecv on the same
transceivers and the other participant's media goes out on them, so whoever offers first, nothing is ever
renegotiated. The room's codec per kind is fixed by the first offer (RTC_VIDEO_CODECS' order for video, Opus first
for audio) and both legs are forced to it. The packet path is `app/rtc/sfu/forward.py`; aiortc's own receivers
and senders on our transceivers are never started (`receive`/`send` replaced per instance). A client that trickles
its ICE candidates (a browser's offer may carry none) hands them over with `candidate()`.
"""

from __future__ import annotations

import asyncio
import collections
import datetime
import logging
import time
from contextlib import suppress
from typing import Any

import msgspec
from aiortc import RTCConfiguration, RTCPeerConnection, RTCRtpTransceiver, RTCSessionDescription
from aiortc.codecs import CODECS
from aiortc.rtcconfiguration import RTCBundlePolicy
from aiortc.rtcdtlstransport import RTCCertificate, RTCDtlsFingerprint
from aiortc.rtcpeerconnection import find_common_codecs
from aiortc.rtcrtpparameters import (
    RTCRtpCodecCapability,
    RTCRtpCodecParameters,
    RTCRtpReceiveParameters,
    RTCRtpSendParameters,
)
from aiortc.sdp import SessionDescription, candidate_from_sdp

from app.errors import Conflict, Invalid
from app.rtc.sfu.forward import Egress, Ingress, Leg, codec_key, is_rtx
from app.rtc.sfu.ice import bind_host_candidates, parse_addresses, parse_ports
from app.rtc.sfu.metrics import Traffic
from app.settings import Settings

log = logging.getLogger("app.rtc.sfu")
KINDS = ("audio", "video")
CERTIFICATE_DAYS = 29  # a certificate is replaced when it has less than this left (aiortc makes them for 30)
# a room closed because its call ended refuses offers for this long: far longer than an offer's way through the
# API (SFU_TIMEOUT_SECONDS), so one that raced the end cannot re-create the room; capped so the memory stays small
ENDED_ROOM_SECONDS = 600.0
ENDED_ROOMS_MAX = 10_000


def _utcnow() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


class RoomFull(Conflict):  # INTERFACE: a third participant offered into a 1:1 room
    default_reason = "room_full"


class CallEnded(Conflict):
    """An offer for a room closed because its call ended (it raced the end through the API)."""

    default_reason = "call_ended"


class CodecUnsupported(Invalid):
    """The offer lacks the codec the room's other participant already sends (the SFU does not transcode)."""

    default_reason = "codec_unsupported"


class SfuLoad(msgspec.Struct):  # INTERFACE: what placement weighs nodes by
    rooms: int
    participants: int
    streams: int  # tracks being forwarded right now


class Occupancy(msgspec.Struct):
    """Who is on the engine now (its metrics' gauges)."""

    rooms: int
    participants: int
    publishers: int  # participants whose media has reached the engine
    subscribers: int  # participants the other's media is forwarded to
    streams: int


class _Participant:
    __slots__ = ("closed", "egress", "ingress", "leg", "pc", "retired")

    def __init__(self, pc: RTCPeerConnection) -> None:
        self.pc = pc
        self.leg: Leg | None = None  # once DTLS is up
        self.ingress: dict[str, Ingress] = {}
        self.egress: dict[str, Egress] = {}
        self.closed = False
        self.retired = False  # its counts moved to the engine's `departed` (Sfu.traffic)

    def leg_of(self, dtls: Any) -> Leg:
        if self.leg is None or self.leg.dtls is not dtls:
            self.leg = Leg(dtls)
        return self.leg


class _Room:
    __slots__ = ("closed", "codecs", "id", "lock", "participants")

    def __init__(self, room_id: str) -> None:
        self.id = room_id
        self.participants: dict[str, _Participant] = {}
        self.lock = asyncio.Lock()
        self.codecs: dict[str, RTCRtpCodecParameters] = {}  # kind → the codec both legs use (aiortc's entry)
        self.closed = False

    def relink(self) -> None:
        """Point every publisher's stream at the other participant's outgoing stream of the same kind."""
        parts = [p for p in self.participants.values() if not p.closed]
        for part in parts:
            other = next((p for p in parts if p is not part), None)
            for kind, ingress in part.ingress.items():
                egress = other.egress.get(kind) if other is not None else None
                if ingress.sink is egress:
                    continue
                if ingress.sink is not None and ingress.sink.source is ingress:
                    ingress.sink.attach(None)
                ingress.sink = egress
                if egress is not None:
                    egress.attach(ingress)


class _Certificate(RTCCertificate):
    """The SFU's DTLS certificate, shared by its connections (as a browser shares one across its own): aiortc
    makes a key pair per connection and hashes it twice per answer, milliseconds of an offer's setup."""

    def getFingerprints(self) -> list[RTCDtlsFingerprint]:
        cached: list[RTCDtlsFingerprint] | None = getattr(self, "_fingerprints", None)
        if cached is None:
            cached = self._fingerprints = super().getFingerprints()
        return cached


def _capability(codec: RTCRtpCodecParameters) -> RTCRtpCodecCapability:
    return RTCRtpCodecCapability(mimeType=codec.mimeType, clockRate=codec.clockRate, channels=codec.channels,
                                 parameters=codec.parameters)


class Sfu:  # INTERFACE
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.addresses = parse_addresses(settings.rtc_host_addresses)
        self.ports = parse_ports(settings.rtc_udp_ports)
        self.video_preference = [f"video/{name.strip().lower()}" for name in settings.rtc_video_codecs.split(",")
                                 if name.strip()]
        self.rooms: dict[str, _Room] = {}
        # room id → when close_room closed it; insertion order is expiry order (one TTL for all)
        self._ended: collections.OrderedDict[str, float] = collections.OrderedDict()
        self._tasks: set[asyncio.Task[None]] = set()
        self._certificate: _Certificate | None = None
        self.departed = Traffic()  # what the participants that have left counted: the counters never go back

    async def offer(self, room_id: str, participant_id: str, sdp: str, type_: str = "offer") -> tuple[str, str]:
        """The participant's offer → our (sdp, "answer"). A participant's second offer (a network change)
        replaces its peer connection; forwarding to and from it resumes on the new one."""
        if type_ != "offer":
            raise Invalid('only an offer ("type": "offer") is answered', "not_an_offer")
        try:
            description = SessionDescription.parse(sdp)
        except Exception as exc:  # aiortc's parser raises whatever the text trips it into
            raise Invalid(f"the offer's SDP cannot be read: {exc}", "invalid_offer") from exc
        media = [m for m in description.media if m.kind in KINDS]
        if not media:
            raise Invalid("the offer has neither audio nor video", "invalid_offer")
        self._refuse_ended(room_id)
        room = self.rooms.get(room_id)
        if room is None:
            room = self.rooms[room_id] = _Room(room_id)
        async with room.lock:
            if room.closed:  # closed while this offer waited: ended (refused), else emptied, a fresh room takes it
                return await self.offer(room_id, participant_id, sdp, type_)
            try:
                if participant_id not in room.participants and len(room.participants) >= 2:
                    raise RoomFull("this call already has two participants")
                codecs = self._room_codecs(room, media)
                participant = _Participant(self._connection())
                try:
                    answer = await self._answer(room, participant, description, sdp, codecs)
                except BaseException:
                    participant.closed = True
                    with suppress(Exception):
                        await participant.pc.close()
                    raise
            except BaseException:
                if not room.participants:  # a refused first offer leaves no empty room behind
                    self._drop(room)
                raise
            room.codecs.update(codecs)
            previous = room.participants.get(participant_id)
            room.participants[participant_id] = participant
            if previous is not None:
                await self._close_participant(room, previous)
            self._watch(room, participant_id, participant)
            return answer, "answer"

    async def candidate(self, room_id: str, participant_id: str, candidate: str | None) -> None:
        """A trickled ICE candidate for the participant's current connection: its SDP line ("candidate:…", with or
        without "a="); None or "": the end of its candidates. For a room or participant not (or no longer) here:
        nothing, the call may just have ended or the connection been replaced."""
        room = self.rooms.get(room_id)
        participant = room.participants.get(participant_id) if room is not None else None
        if participant is None or participant.closed:
            return
        pc = participant.pc
        if not candidate:
            await pc.addIceCandidate(None)
            return
        try:
            parsed = candidate_from_sdp(candidate.strip().removeprefix("a=").removeprefix("candidate:"))
        except (AssertionError, ValueError, IndexError) as exc:
            raise Invalid("the ICE candidate cannot be read", "invalid_candidate") from exc
        # every m-line shares the one bundled transport; aiortc takes candidates only for the m-line owning it
        parsed.sdpMid = pc.getTransceivers()[0].mid
        await pc.addIceCandidate(parsed)

    async def close_room(self, room_id: str) -> None:
        """Close every peer connection of the room and free its tasks, sockets and ports (idempotent). The call
        has ended: offers for the room are refused (`CallEnded`) from now on, also one already waiting here."""
        self._remember_ended(room_id)
        room = self.rooms.get(room_id)
        if room is None:
            return
        async with room.lock:
            self._drop(room)
            for participant in list(room.participants.values()):
                await self._close_participant(room, participant)
            room.participants.clear()

    async def close(self) -> None:
        """Every room (shutdown)."""
        await asyncio.gather(*(self.close_room(room_id) for room_id in list(self.rooms)), return_exceptions=True)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def load(self) -> SfuLoad:
        participants = streams = 0
        for room in self.rooms.values():
            for participant in room.participants.values():
                participants += 1
                streams += sum(1 for ingress in participant.ingress.values() if ingress.sink is not None)
        return SfuLoad(rooms=len(self.rooms), participants=participants, streams=streams)

    def traffic(self) -> Traffic:
        """Everything forwarded and handled so far: the left participants' counts and the present ones'."""
        total = self.departed.copy()
        for room in list(self.rooms.values()):
            for participant in list(room.participants.values()):
                if not participant.retired:
                    total.add(participant.ingress.values(), participant.egress.values())
        return total

    def occupancy(self) -> Occupancy:
        participants = publishers = subscribers = streams = 0
        for room in list(self.rooms.values()):
            for participant in list(room.participants.values()):
                if participant.closed:
                    continue
                participants += 1
                publishers += any(i.media_ssrc is not None for i in participant.ingress.values())
                subscribers += any(e.source is not None for e in participant.egress.values())
                streams += sum(1 for i in participant.ingress.values() if i.sink is not None)
        return Occupancy(rooms=len(self.rooms), participants=participants, publishers=publishers,
                         subscribers=subscribers, streams=streams)

    def _remember_ended(self, room_id: str) -> None:
        now = time.monotonic()
        ended = self._ended
        ended[room_id] = now
        ended.move_to_end(room_id)  # its expiry is now the latest
        while ended:  # the expired, and the oldest past the cap, go first
            oldest = next(iter(ended))
            if len(ended) <= ENDED_ROOMS_MAX and now - ended[oldest] < ENDED_ROOM_SECONDS:
                break
            del ended[oldest]

    def _refuse_ended(self, room_id: str) -> None:
        at = self._ended.get(room_id)
        if at is not None and time.monotonic() - at < ENDED_ROOM_SECONDS:
            raise CallEnded("the call has ended")

    # --- negotiation ---
    def _connection(self) -> RTCPeerConnection:
        pc = RTCPeerConnection(RTCConfiguration(iceServers=[], bundlePolicy=RTCBundlePolicy.MAX_BUNDLE))
        certificate = self._certificate
        # aiortc's certificates live 30 days; a new one well before that (connections keep the one they have)
        if certificate is None or certificate.expires - datetime.timedelta(days=CERTIFICATE_DAYS) < _utcnow():
            certificate = self._certificate = _Certificate.generateCertificate()
        pc._RTCPeerConnection__certificates = [certificate]  # type: ignore[attr-defined]  # before any transport
        return pc

    def _room_codecs(self, room: _Room, media: list[Any]) -> dict[str, RTCRtpCodecParameters]:
        """The codec per kind for this offer: the room's when set (the offer must have it), else the best the
        offer has by our preference."""
        chosen: dict[str, RTCRtpCodecParameters] = {}
        for m in media:
            if m.kind in chosen:
                continue
            common = [c for c in find_common_codecs(CODECS[m.kind], m.rtp.codecs) if not is_rtx(c)]
            fixed = room.codecs.get(m.kind)
            if fixed is not None:
                if not any(codec_key(c) == codec_key(fixed) for c in common):
                    raise CodecUnsupported(f"the call's {m.kind} is {fixed.mimeType.split('/')[1]}, which this "
                                           "offer does not include")
                chosen[m.kind] = fixed
                continue
            if m.kind == "video":
                ranked = sorted((c for c in common if c.mimeType.lower() in self.video_preference),
                                key=lambda c: self.video_preference.index(c.mimeType.lower()))
            else:
                ranked = common  # aiortc's order: Opus first
            if not ranked:
                raise CodecUnsupported(f"the offer's {m.kind} has no codec the SFU forwards")
            chosen[m.kind] = ranked[0]
        return chosen

    async def _answer(self, room: _Room, participant: _Participant, description: SessionDescription, sdp: str,
                      codecs: dict[str, RTCRtpCodecParameters]) -> str:
        pc = participant.pc
        # one transceiver per kind, in the order of the offer's BUNDLE group (its first m-line owns the one
        # transport: aiortc would otherwise stop the shared transport as a bundled-away one)
        order = [m.rtp.muxId for m in description.media]
        bundle = next((g.items for g in description.group if g.semantic == "BUNDLE"), None)
        if bundle:
            order = [mid for mid in bundle if mid in order] + [mid for mid in order if mid not in bundle]
        kinds: list[str] = []
        for mid in order:
            m = next(m for m in description.media if m.rtp.muxId == mid)
            if m.kind in KINDS and m.kind not in kinds:
                kinds.append(m.kind)
        for kind in kinds:
            transceiver = pc.addTransceiver(kind, direction="sendrecv")
            preferences = [_capability(codecs[kind])]
            if kind == "video":
                preferences.append(RTCRtpCodecCapability(mimeType="video/rtx", clockRate=90000))
            transceiver.setCodecPreferences(preferences)
            self._hook(room, participant, transceiver)
        bind_host_candidates(pc, self.addresses, self.ports, self.settings.rtc_udp_rcvbuf_bytes)
        try:
            await pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type="offer"))
            await pc.setLocalDescription(await pc.createAnswer())
        except ValueError as exc:  # what aiortc raises for SDP it cannot negotiate
            raise Invalid(f"the offer cannot be answered: {exc}", "invalid_offer") from exc
        except Exception as exc:  # aiortc's InternalError / OperationError / InvalidStateError
            if type(exc).__module__ == "aiortc.exceptions":
                raise Invalid(f"the offer cannot be answered: {exc}", "invalid_offer") from exc
            raise
        return str(pc.localDescription.sdp)

    def _hook(self, room: _Room, participant: _Participant, transceiver: RTCRtpTransceiver) -> None:
        """Our transceivers' receiver and sender are never started: once DTLS is up aiortc calls `receive`/`send`
        with the negotiated parameters, and these register the packet path in their place."""
        kind = transceiver.kind
        receiver, sender = transceiver.receiver, transceiver.sender

        async def receive(parameters: RTCRtpReceiveParameters) -> None:
            if participant.closed or kind in participant.ingress:
                return
            leg = participant.leg_of(receiver.transport)
            ingress = Ingress(kind, leg, parameters, rtcp_ssrc=sender._ssrc)
            receiver.transport._register_rtp_receiver(ingress, parameters)
            for codec in parameters.codecs:
                if codec.payloadType is not None:
                    leg.by_pt[codec.payloadType] = ingress
            leg.enable_fast_path()
            participant.ingress[kind] = ingress
            room.relink()
            self._request_keyframes(room)

        async def send(parameters: RTCRtpSendParameters) -> None:
            if participant.closed or kind in participant.egress:
                return
            egress = Egress(kind, participant.leg_of(sender.transport), parameters, ssrc=sender._ssrc,
                            rtx_ssrc=sender._rtx_ssrc)
            sender.transport._register_rtp_sender(egress, parameters)
            participant.egress[kind] = egress
            room.relink()
            self._request_keyframes(room)

        receiver.receive = receive  # type: ignore[method-assign]  # this instance only
        sender.send = send  # type: ignore[method-assign]

    def _request_keyframes(self, room: _Room) -> None:
        """A subscriber that just appeared (or a publisher that came back) waits for a keyframe: ask at once
        rather than at the next delta frame."""
        for participant in list(room.participants.values()):
            for ingress in list(participant.ingress.values()):
                if ingress.video and ingress.sink is not None and ingress.sink.waiting_keyframe:
                    ingress.request_keyframe()

    # --- lifetime ---
    def _watch(self, room: _Room, participant_id: str, participant: _Participant) -> None:
        """A connection that fails (ICE consent lost: the device went away) or that the other end closed (aiortc
        then closes ours) leaves the room, its socket and port freed; the participant may offer again."""

        @participant.pc.on("connectionstatechange")
        def on_state() -> None:
            if participant.pc.connectionState in ("failed", "closed") and not participant.closed:
                task = asyncio.ensure_future(self._fail(room, participant_id, participant))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

    async def _fail(self, room: _Room, participant_id: str, participant: _Participant) -> None:
        async with room.lock:
            if room.participants.get(participant_id) is participant:
                del room.participants[participant_id]
                await self._close_participant(room, participant)
                if not room.participants:
                    self._drop(room)

    def _retire(self, participant: _Participant) -> None:
        """Its counts join the engine's, in the same step it leaves what `traffic()` reads (no await between):
        a scrape never sees a counter go back."""
        if not participant.retired:
            participant.retired = True
            self.departed.add(participant.ingress.values(), participant.egress.values())

    async def _close_participant(self, room: _Room, participant: _Participant) -> None:
        self._retire(participant)
        participant.closed = True
        for ingress in participant.ingress.values():
            if ingress.sink is not None and ingress.sink.source is ingress:
                ingress.sink.attach(None)
            ingress.close()
        for egress in participant.egress.values():
            if egress.source is not None and egress.source.sink is egress:
                egress.source.sink = None
            egress.attach(None)
            egress.close()  # its retransmission buffer is freed now, not whenever the connection is collected
        room.relink()
        if participant.leg is not None:
            participant.leg.disable_fast_path()
        with suppress(Exception):  # a connection half set up still frees what it holds
            await participant.pc.close()
        log.debug("sfu: closed a peer connection of room %s", room.id)

    def _drop(self, room: _Room) -> None:
        room.closed = True
        for participant in room.participants.values():  # closed one by one after this, out of `traffic()`'s sight
            self._retire(participant)
        if self.rooms.get(room.id) is room:
            del self.rooms[room.id]
