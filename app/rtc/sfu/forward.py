"""The packet path: one participant's incoming RTP stream (`Ingress`) is forwarded to the other participant's
outgoing stream of the same kind (`Egress`) without decoding or reassembling frames.

How a packet flows, all in the socket's callback, no task switch (`Leg.receive_datagram`): the SFU's own UDP
protocol (`app/rtc/sfu/ice.py` `MediaProtocol`) hands an SRTP datagram straight to the participant's `Leg`,
which unprotects it with the DTLS transport's SRTP session and routes it by payload type to the m-line's
`Ingress` (registered with the transport in place of aiortc's `RTCRtpReceiver`, so no jitter buffer, depacketiser
or decoder thread ever runs). The header is read in place (no packet object); the linked `Egress` writes a new
header (SSRC, sequence number, timestamp, payload type, this leg's header extensions) in front of the untouched
payload, keeps the result in a short retransmission buffer, protects it with that leg's SRTP session and writes it
to that leg's nominated ICE pair. aiortc's `RTCRtpSender` for the m-line is never started (no encoder, no polling
task); the `Egress` takes its SSRC (the one the answer advertised) and its place in the transport's RTCP routing.
Everything else (STUN, DTLS, SRTCP, and RTP before the fast path is on) takes aiortc's own path, which ends in
the same objects.

RTCP: the subscriber's NACKs are answered from the buffer (else relayed upstream with translated sequence
numbers), each sequence number once, at most NACK_ANSWERS per NACK and a packet at most once per
RESEND_INTERVAL_MS; its PLI/FIR and REMB are relayed upstream to the publisher's media SSRC (never its RTX SSRC); the
publisher's sender reports are translated and forwarded (keeps lip sync) and answered with a receiver report
(+ REMB for video). A subscriber that starts (or whose source changes) gets nothing of a video stream until a
keyframe arrives, and PLIs, rate-limited, ask the publisher for one.

Private aiortc/aioice hooks (pinned in pyproject.toml, each covered by tests/integration/test_sfu_media.py and
test_sfu_keyframes.py): `RTCDtlsTransport._register_rtp_receiver` / `_register_rtp_sender`, `_rx_srtp`,
`_tx_srtp`, `_state`, `_rtp_header_extensions_map`, `_rtp_router.ssrc_table`, the router's calls back
(`_handle_rtp_packet(packet, arrival_time_ms)`, `_handle_rtcp_packet`, `_handle_disconnect`, `_ssrc`),
`RTCRtpSender._ssrc` / `_rtx_ssrc`, `RTCIceTransport._connection`, aioice's `Connection._nominated` and
`CandidatePair.protocol` / `remote_addr`, and the `aiortc.rtp` packet classes.
"""

from __future__ import annotations

import asyncio
import os
import struct
import time
from typing import Any

import pylibsrtp
from aiortc.rtcdtlstransport import RTCDtlsTransport, State
from aiortc.rtcrtpparameters import RTCRtpCodecParameters, RTCRtpReceiveParameters, RTCRtpSendParameters
from aiortc.rtp import (
    RTCP_PSFB_APP,
    RTCP_PSFB_FIR,
    RTCP_PSFB_PLI,
    RTCP_RTPFB_NACK,
    RtcpByePacket,
    RtcpPsfbPacket,
    RtcpReceiverInfo,
    RtcpRrPacket,
    RtcpRtpfbPacket,
    RtcpSdesPacket,
    RtcpSenderInfo,
    RtcpSourceInfo,
    RtcpSrPacket,
    RtpPacket,
    is_rtcp,
    pack_remb_fci,
    unpack_remb_fci,
)

from app.rtc.sfu.ice import MediaProtocol
from app.rtc.sfu.rewrite import StreamRewriter

KEYFRAME_REQUEST_SECONDS = 0.3  # PLIs upstream at most this often per stream (a stalled subscriber repeats them)
RETRANSMIT_PACKETS = 256  # per video stream: about 2.5 s at 800 kbit/s, longer than any useful NACK round trip
# one NACK (up to ~6,000 sequence numbers in a 1.4 KB packet, repeats allowed) is answered for at most this many
# distinct ones, and a packet is resent at most once per interval: feedback never multiplies into a flood
NACK_ANSWERS = 64
RESEND_INTERVAL_MS = 100
DEFAULT_REMB_BPS = 2_000_000  # told to a publisher whose subscriber has said nothing yet (or has gone)
REMB_FRESH_SECONDS = 5.0
_NTP_EPOCH_OFFSET = 2208988800  # 1900-01-01 to 1970-01-01, seconds


def codec_key(codec: RTCRtpCodecParameters) -> tuple[str, int, tuple[tuple[str, str], ...]]:
    """What makes two legs' codecs the same stream format (payload types differ per leg)."""
    return codec.mimeType.lower(), codec.clockRate, tuple(sorted((k, str(v)) for k, v in codec.parameters.items()))


def payload_type(codec: RTCRtpCodecParameters) -> int:
    assert codec.payloadType is not None  # every negotiated codec has one
    return codec.payloadType


def is_rtx(codec: RTCRtpCodecParameters) -> bool:
    return codec.mimeType.lower().endswith("/rtx")


def vp8_keyframe_start(payload: bytes) -> bool:
    """The packet opens a VP8 keyframe: payload descriptor S=1, partition 0, and the frame header's P bit clear
    (RFC 7741 §4.2, §4.3)."""
    if len(payload) < 2:
        return False
    first = payload[0]
    if not first & 0x10 or first & 0x07:
        return False
    pos = 1
    if first & 0x80:  # X: extension byte
        ext = payload[1]
        pos = 2
        if ext & 0x80:  # I: picture id, 7 or 15 bits
            if len(payload) <= pos:
                return False
            pos += 2 if payload[pos] & 0x80 else 1
        if ext & 0x40:  # L: TL0PICIDX
            pos += 1
        if ext & 0x30:  # T or K: TID/KEYIDX
            pos += 1
    return len(payload) > pos and not payload[pos] & 0x01


def h264_keyframe_start(payload: bytes) -> bool:
    """The packet carries the start of an IDR picture or its SPS (RFC 6184: single NAL, STAP-A, FU-A)."""
    if not payload:
        return False
    nal = payload[0] & 0x1F
    if nal in (5, 7):
        return True
    if nal == 24:  # STAP-A: 16-bit size, NAL unit, ...
        pos = 1
        while pos + 2 < len(payload):
            if payload[pos + 2] & 0x1F in (5, 7):
                return True
            pos += 2 + int.from_bytes(payload[pos:pos + 2], "big")
        return False
    if nal == 28 and len(payload) > 1:  # FU-A: start bit and the fragmented unit's type
        return bool(payload[1] & 0x80) and payload[1] & 0x1F in (5, 7)
    return False


_KEYFRAME_START = {"video/vp8": vp8_keyframe_start, "video/h264": h264_keyframe_start}


_SEQ_TS_SSRC = struct.Struct("!HII")  # RTP header bytes 2..11
_EXTENSION = struct.Struct("!HH")  # profile, length in 32-bit words
_HEADER = struct.Struct("!BBHII")
_HEADER_EXT = struct.Struct("!BBHIIHH")  # with a one-byte-header extension block (RFC 8285)
_ONE_BYTE_PROFILE = 0xBEDE


def extension_id(parameters: Any, uri_end: str) -> int:
    """The id this leg negotiated for a header extension (0: not negotiated)."""
    return next((e.id for e in parameters.headerExtensions if e.uri.endswith(uri_end)), 0)


def one_byte_extension(data: bytes, start: int, end: int, wanted: int) -> int | None:
    """The first value byte of extension `wanted` in a one-byte-header block (RFC 8285 §4.2), if present."""
    i = start
    while i < end:
        first = data[i]
        if first == 0:  # padding between elements
            i += 1
            continue
        element = first >> 4
        if element == 15:
            return None
        if element == wanted:
            return data[i + 1] if i + 1 < end else None
        i += 2 + (first & 0x0F)
    return None


def _now_ms() -> int:
    return int(time.monotonic() * 1000)


def nacked(lost: list[int]) -> list[int]:
    """A NACK's sequence numbers, each once (in 16 bits: a PID+BLP near the wrap runs past 65535), the first
    NACK_ANSWERS of them."""
    return list(dict.fromkeys(seq & 0xFFFF for seq in lost))[:NACK_ANSWERS]


class _Sent:
    """A packet in an outgoing video stream's retransmission buffer."""

    __slots__ = ("data", "header_length", "resent_ms", "seq")

    def __init__(self, seq: int, data: bytes, header_length: int) -> None:
        self.seq = seq
        self.data = data  # the plain packet as it went out
        self.header_length = header_length
        self.resent_ms = -RESEND_INTERVAL_MS  # never resent yet


class Leg:
    """One participant's connection (one bundled DTLS transport): its fast receive path and its sending."""

    def __init__(self, dtls: RTCDtlsTransport) -> None:
        self.dtls = dtls
        self.fast_packets = 0  # RTP datagrams that took the fast path (the rest went through aiortc's)
        # payload type → the m-line's Ingress: with BUNDLE every m-line has its own payload types (and the SFU
        # forces one codec per kind), so the type alone routes, as aiortc's router does for an unknown SSRC
        self.by_pt: dict[int, Ingress] = {}
        self._pair: Any = None  # the nominated ICE pair last seen, and where it sends
        self._protocol: MediaProtocol | None = None
        self._sendto: Any = None
        self._remote: tuple[str, int] = ("", 0)

    def enable_fast_path(self) -> None:
        """From now on (DTLS is up, the SRTP sessions exist) this leg's SRTP datagrams skip aiortc's queue."""
        for protocol in self.dtls.transport._connection._protocols:
            if isinstance(protocol, MediaProtocol):
                protocol.fast = self.receive_datagram

    def disable_fast_path(self) -> None:
        for protocol in self.dtls.transport._connection._protocols:
            if isinstance(protocol, MediaProtocol):
                protocol.fast = None

    def receive_datagram(self, data: bytes) -> None:
        try:
            plain = self.dtls._rx_srtp.unprotect(data)
        except pylibsrtp.Error:  # forged, replayed or corrupt: dropped, as aiortc would
            return
        ingress = self.by_pt.get(plain[1] & 0x7F)
        if ingress is not None:
            self.fast_packets += 1
            ingress.receive(plain)

    def send(self, data: bytes) -> bool:
        """Protect and send an RTP or RTCP packet now; False when the leg cannot send (closing, not connected)."""
        dtls = self.dtls
        if dtls._state != State.CONNECTED:
            return False
        pair = dtls.transport._connection._nominated.get(1)
        if pair is None:
            return False
        if pair is not self._pair:
            self._pair = pair
            protocol, transport = pair.protocol, getattr(pair.protocol, "transport", None)
            ours = protocol if isinstance(protocol, MediaProtocol) and transport is not None else None
            self._protocol = ours
            self._sendto = transport.sendto if ours is not None and transport is not None else None
            self._remote = pair.remote_addr
        if self._protocol is not None and self._protocol.paused:
            return False
        try:
            protected = dtls._tx_srtp.protect_rtcp(data) if is_rtcp(data) else dtls._tx_srtp.protect(data)
        except pylibsrtp.Error:
            return False
        if self._sendto is not None:
            self._sendto(protected, self._remote)
        else:  # a pair that is not one of ours (never for the SFU's host candidates): aioice's own send
            task = asyncio.ensure_future(pair.protocol.send_data(protected, self._remote))
            task.add_done_callback(lambda t: t.cancelled() or t.exception())
        return True


class Ingress:
    """A publisher's stream of one kind, as the RTP receiver its DTLS transport routes packets to."""

    def __init__(self, kind: str, leg: Leg, parameters: RTCRtpReceiveParameters, rtcp_ssrc: int) -> None:
        self.kind = kind
        self.video = kind == "video"
        self.leg = leg
        self.rtcp_ssrc = rtcp_ssrc  # ours on this leg (the transceiver's sender SSRC, as aiortc's receiver uses)
        self.level_id = extension_id(parameters, "ssrc-audio-level") if kind == "audio" else 0
        self.codecs = {payload_type(c): c for c in parameters.codecs if not is_rtx(c)}
        self.rtx_apt: dict[int, int] = {}
        for c in parameters.codecs:
            apt = c.parameters.get("apt")
            if is_rtx(c) and isinstance(apt, int):
                self.rtx_apt[payload_type(c)] = apt
        self.sink: Egress | None = None
        self.pt_out: dict[int, int] = {}  # our payload type → the subscriber leg's, for the linked sink
        self.media_ssrc: int | None = None  # learned from non-RTX packets: where PLIs must go
        # receiver-report statistics (RFC 3550 A.3), kept lean: counted per packet, computed per report
        self.received = 0
        self.base_seq = 0
        self.max_seq = 0
        self.cycles = 0
        self._expected_prior = 0
        self._received_prior = 0
        self._last_keyframe_request = -KEYFRAME_REQUEST_SECONDS
        self._deferred_keyframe: asyncio.TimerHandle | None = None
        self.keyframe_requests = 0  # PLIs sent upstream
        self.nacks_sent = 0  # NACKs relayed upstream (what the subscriber's buffer could not answer)
        self.closed = False
        self._remb_bps = 0
        self._remb_at = -REMB_FRESH_SECONDS

    # --- called by aiortc's RtpRouter (packets before the fast path is on) ---
    async def _handle_rtp_packet(self, packet: RtpPacket, arrival_time_ms: int) -> None:
        self.receive(packet.serialize(self.leg.dtls._rtp_header_extensions_map))

    def receive(self, data: bytes) -> None:
        """One plain RTP packet from the publisher (RFC 3550 §5.1), read in place: only the fixed header, the
        audio level for audio, and where the payload starts."""
        if len(data) < 12:
            return
        first, second = data[0], data[1]
        pt = second & 0x7F
        seq, ts, ssrc = _SEQ_TS_SSRC.unpack_from(data, 2)
        pos = 12 + 4 * (first & 0x0F)  # CSRCs are not passed on: one source per stream here
        level = None
        if first & 0x10:
            if len(data) < pos + 4:
                return
            profile, words = _EXTENSION.unpack_from(data, pos)
            start, pos = pos + 4, pos + 4 + 4 * words
            if self.level_id and profile == _ONE_BYTE_PROFILE:
                level = one_byte_extension(data, start, min(pos, len(data)), self.level_id)
        end = len(data) - (data[-1] if first & 0x20 else 0)  # padding is dropped
        if end < pos:
            return
        apt = self.rtx_apt.get(pt)
        if apt is not None:  # a retransmission: the original sequence number leads the payload (RFC 4588)
            if end - pos < 2 or self.media_ssrc is None:  # padding only (bandwidth probes): nothing to pass on
                return
            seq = (data[pos] << 8) | data[pos + 1]
            pos += 2
            ssrc, pt = self.media_ssrc, apt
        elif pt in self.codecs:
            if ssrc != self.media_ssrc:
                # so the publisher's sender reports reach us even when its offer listed no SSRC (aiortc's router
                # learns SSRCs only from packets it routes itself); only the current one, so a publisher that
                # keeps changing SSRC does not grow the table
                table = self.leg.dtls._rtp_router.ssrc_table
                if self.media_ssrc is not None and table.get(self.media_ssrc) is self:
                    del table[self.media_ssrc]
                table[ssrc] = self
                self.media_ssrc = ssrc
                self.received = 0
                self.base_seq = self.max_seq = seq
                self.cycles = self._expected_prior = self._received_prior = 0
            elif ((seq - self.max_seq) & 0xFFFF) < 0x8000:
                if seq < self.max_seq:
                    self.cycles += 0x10000
                self.max_seq = seq
            self.received += 1
        else:
            return
        sink = self.sink
        if sink is None:
            return
        out_pt = self.pt_out.get(pt)
        if out_pt is not None:
            sink.forward(ssrc, seq, ts, second & 0x80, data[pos:end], level, out_pt, _now_ms())

    async def _handle_rtcp_packet(self, packet: Any) -> None:
        if isinstance(packet, RtcpSrPacket):
            sink = self.sink
            if sink is not None:
                sink.relay_sender_report(packet)
            self._report(packet)
        # a BYE needs nothing: the stream simply stops (aiortc's receiver would stop its decoder)

    def _handle_disconnect(self) -> None:
        pass

    # --- upstream feedback ---
    def request_keyframe(self) -> None:
        """A PLI to the publisher's media SSRC, at most every KEYFRAME_REQUEST_SECONDS; one asked for sooner is
        sent when the interval ends (a subscriber's request is never lost to the limit)."""
        if not self.video or self.media_ssrc is None or self.closed:
            return
        wait = self._last_keyframe_request + KEYFRAME_REQUEST_SECONDS - time.monotonic()
        if wait > 0:
            if self._deferred_keyframe is None:
                self._deferred_keyframe = asyncio.get_running_loop().call_later(wait, self._deferred_request)
            return
        self._last_keyframe_request = time.monotonic()
        self.keyframe_requests += 1
        self.leg.send(bytes(RtcpPsfbPacket(fmt=RTCP_PSFB_PLI, ssrc=self.rtcp_ssrc, media_ssrc=self.media_ssrc)))

    def _deferred_request(self) -> None:
        self._deferred_keyframe = None
        self.request_keyframe()

    def close(self) -> None:
        self.closed = True
        self.sink = None
        if self._deferred_keyframe is not None:
            self._deferred_keyframe.cancel()
            self._deferred_keyframe = None

    def send_nack(self, lost: list[int]) -> None:
        if self.media_ssrc is None:
            return
        nack = RtcpRtpfbPacket(fmt=RTCP_RTPFB_NACK, ssrc=self.rtcp_ssrc, media_ssrc=self.media_ssrc)
        nack.lost = sorted(lost)
        if self.leg.send(bytes(nack)):
            self.nacks_sent += 1

    def relay_remb(self, bitrate: int) -> None:
        self._remb_bps, self._remb_at = bitrate, time.monotonic()
        if self.media_ssrc is not None:
            self.leg.send(bytes(self._remb(bitrate)))

    def _remb(self, bitrate: int) -> RtcpPsfbPacket:
        assert self.media_ssrc is not None
        return RtcpPsfbPacket(fmt=RTCP_PSFB_APP, ssrc=self.rtcp_ssrc, media_ssrc=0,
                              fci=pack_remb_fci(bitrate, [self.media_ssrc]))

    def _report(self, sr: RtcpSrPacket) -> None:
        """Answer a sender report with a receiver report (DLSR 0: sent at once), so the publisher knows loss and
        round trip and its bandwidth estimate does not starve; video also gets the bitrate the subscriber allows."""
        if self.media_ssrc is None:
            return
        expected = self.cycles + ((self.max_seq - self.base_seq) & 0xFFFF) + 1
        interval_expected = expected - self._expected_prior
        interval_lost = interval_expected - (self.received - self._received_prior)
        self._expected_prior, self._received_prior = expected, self.received
        fraction = (interval_lost << 8) // interval_expected if interval_expected > 0 and interval_lost > 0 else 0
        lost = max(-0x800000, min(expected - self.received, 0x7FFFFF))
        report = RtcpReceiverInfo(ssrc=self.media_ssrc, fraction_lost=min(fraction, 255), packets_lost=lost,
                                  highest_sequence=(self.cycles + self.max_seq) & 0xFFFFFFFF, jitter=0,
                                  lsr=(sr.sender_info.ntp_timestamp >> 16) & 0xFFFFFFFF, dlsr=0)
        data = bytes(RtcpRrPacket(ssrc=self.rtcp_ssrc, reports=[report]))
        if self.video:
            fresh = time.monotonic() - self._remb_at < REMB_FRESH_SECONDS
            data += bytes(self._remb(self._remb_bps if fresh else DEFAULT_REMB_BPS))
        self.leg.send(data)


class Egress:
    """A subscriber's stream of one kind, sent on the SSRC the answer advertised for the m-line; registered with
    the subscriber's DTLS transport as that SSRC's RTP sender, so its RTCP feedback comes here."""

    def __init__(self, kind: str, leg: Leg, parameters: RTCRtpSendParameters, ssrc: int, rtx_ssrc: int) -> None:
        self.kind = kind
        self.video = kind == "video"
        self.leg = leg
        self._ssrc = ssrc  # the name aiortc's RtpRouter reads
        self.rtx_ssrc = rtx_ssrc
        self.mid = parameters.muxId
        self.cname = parameters.rtcp.cname
        # this leg's header extensions: our mid (the same bytes on every packet), our send time for video (the
        # subscriber's bandwidth estimate measures this leg), the publisher's audio level for audio
        mid_id = extension_id(parameters, "sdes:mid")
        mid = (self.mid or "").encode()
        self.mid_element = bytes([(mid_id << 4) | (len(mid) - 1)]) + mid if mid_id and 0 < len(mid) <= 16 else b""
        self.abs_id = extension_id(parameters, "abs-send-time") if self.video else 0
        self.level_id = extension_id(parameters, "ssrc-audio-level") if not self.video else 0
        self.codecs = {codec_key(c): c for c in parameters.codecs if not is_rtx(c)}
        self.rtx_pt: dict[int, int] = {}  # media payload type → its RTX payload type on this leg
        for c in parameters.codecs:
            apt = c.parameters.get("apt")
            if is_rtx(c) and isinstance(apt, int):
                self.rtx_pt[apt] = payload_type(c)
        first = next(iter(self.codecs.values()), None)
        # a random start, the sequence number in the lower half as aiortc does (no wrap early in the stream)
        self.rewriter = StreamRewriter(first.clockRate if first else 90000,
                                       start_seq=int.from_bytes(os.urandom(2), "big") % 32768,
                                       start_ts=int.from_bytes(os.urandom(4), "big"))
        self.keyframe_start = _KEYFRAME_START.get(first.mimeType.lower()) if first and self.video else None
        self.waiting_keyframe = self.keyframe_start is not None
        # what went out, by sequence number modulo its size (None: audio, or closed)
        self.history: list[_Sent | None] | None = [None] * RETRANSMIT_PACKETS if self.video else None
        self._rtx_seq = int.from_bytes(os.urandom(2), "big") % 32768
        self.source: Ingress | None = None
        # plain integers read at scrape time (app/rtc/sfu/metrics.py); packets and octets go in our sender reports
        self.packets = 0
        self.octets = 0
        self.retransmitted = 0  # packets resent from the buffer in answer to NACKs
        self.nacks_received = 0
        self.keyframe_requests_received = 0  # PLIs and FIRs from the subscriber

    def attach(self, source: Ingress | None) -> None:
        """Feed from source (None: detach). A video stream then waits for a keyframe again."""
        self.source = source
        if source is not None:
            source.pt_out = {pt: payload_type(self.codecs[codec_key(c)])
                             for pt, c in source.codecs.items() if codec_key(c) in self.codecs}
            if self.keyframe_start is not None:
                self.waiting_keyframe = True
                self.rewriter.resync()

    def forward(self, ssrc: int, seq: int, ts: int, marker: int, payload: bytes, level: int | None, out_pt: int,
                now_ms: int) -> None:
        rewriter = self.rewriter
        if self.keyframe_start is not None:
            if ssrc != rewriter.source and ssrc != rewriter.retired and rewriter.source is not None:
                self.waiting_keyframe = True  # a new source (publisher reconnected): its deltas mean nothing here
            if self.waiting_keyframe:
                if not self.keyframe_start(payload):
                    rewriter.resync()
                    if self.source is not None:
                        self.source.request_keyframe()
                    return
                self.waiting_keyframe = False
        mapped = rewriter.rewrite(ssrc, seq, ts, now_ms)
        if mapped is None:
            return
        out_seq, out_ts = mapped
        ext = self.mid_element
        if self.abs_id:  # 6.18 fixed-point seconds, 24 bits
            sent = int((time.time() + _NTP_EPOCH_OFFSET) * 262144) & 0xFFFFFF
            ext += bytes(((self.abs_id << 4) | 2, sent >> 16, (sent >> 8) & 0xFF, sent & 0xFF))
        if level is not None and self.level_id:
            ext += bytes(((self.level_id << 4), level))
        if ext:
            ext += b"\0" * (-len(ext) % 4)
            header = _HEADER_EXT.pack(0x90, marker | out_pt, out_seq, out_ts, self._ssrc, _ONE_BYTE_PROFILE,
                                      len(ext) // 4) + ext
        else:
            header = _HEADER.pack(0x80, marker | out_pt, out_seq, out_ts, self._ssrc)
        data = header + payload
        history = self.history
        if history is not None:
            history[out_seq % RETRANSMIT_PACKETS] = _Sent(out_seq, data, len(header))
        if self.leg.send(data):
            self.packets += 1
            self.octets += len(payload)

    def relay_sender_report(self, sr: RtcpSrPacket) -> None:
        """The publisher's NTP ↔ RTP mapping, in this stream's timestamps (what lip sync needs), with our counts."""
        rewriter = self.rewriter
        if sr.ssrc != rewriter.source or self.packets == 0:
            return
        info = RtcpSenderInfo(ntp_timestamp=sr.sender_info.ntp_timestamp,
                              rtp_timestamp=(sr.sender_info.rtp_timestamp + rewriter.ts_offset) & 0xFFFFFFFF,
                              packet_count=self.packets & 0xFFFFFFFF, octet_count=self.octets & 0xFFFFFFFF)
        data = bytes(RtcpSrPacket(ssrc=self._ssrc, sender_info=info))
        if self.cname:
            data += bytes(RtcpSdesPacket(chunks=[RtcpSourceInfo(ssrc=self._ssrc,
                                                                items=[(1, self.cname.encode())])]))
        self.leg.send(data)

    # --- called by aiortc's RtpRouter: the subscriber's feedback about this stream ---
    async def _handle_rtcp_packet(self, packet: Any) -> None:
        if isinstance(packet, RtcpRtpfbPacket):
            if packet.fmt == RTCP_RTPFB_NACK:
                self.nacks_received += 1
                self._answer_nack(packet.lost, _now_ms())
        elif isinstance(packet, RtcpPsfbPacket):
            source = self.source
            if packet.fmt in (RTCP_PSFB_PLI, RTCP_PSFB_FIR):
                self.keyframe_requests_received += 1
                if source is not None:
                    source.request_keyframe()
            elif packet.fmt == RTCP_PSFB_APP and source is not None:
                try:
                    bitrate, _ = unpack_remb_fci(packet.fci)
                except ValueError:
                    return
                source.relay_remb(bitrate)
        elif isinstance(packet, RtcpByePacket):
            pass

    def close(self) -> None:
        """The participant left: its retransmission buffer goes with it."""
        self.history = None
        self.source = None

    def _answer_nack(self, lost: list[int], now_ms: int) -> None:
        missing = []
        history = self.history
        for seq in nacked(lost):
            entry = history[seq % RETRANSMIT_PACKETS] if history is not None else None
            if entry is not None and entry.seq == seq:
                if now_ms - entry.resent_ms < RESEND_INTERVAL_MS:
                    continue  # just resent: it is on its way (or lost again, and the next NACK asks once more)
                entry.resent_ms = now_ms
                data, header_length = entry.data, entry.header_length
                rtx_pt = self.rtx_pt.get(data[1] & 0x7F)
                if rtx_pt is not None:  # RFC 4588: own SSRC and sequence, the original number before the payload
                    rtx = bytearray(data[:header_length])
                    rtx[1] = (data[1] & 0x80) | rtx_pt
                    struct.pack_into("!H", rtx, 2, self._rtx_seq)
                    struct.pack_into("!I", rtx, 8, self.rtx_ssrc)
                    self._rtx_seq = (self._rtx_seq + 1) & 0xFFFF
                    data = bytes(rtx) + seq.to_bytes(2, "big") + data[header_length:]
                if self.leg.send(data):
                    self.retransmitted += 1
            else:
                upstream = self.rewriter.to_incoming_seq(seq)
                if upstream is not None:
                    missing.append(upstream)
        if missing and self.source is not None:
            self.source.send_nack(missing)
