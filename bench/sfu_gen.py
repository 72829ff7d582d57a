"""The SFU benchmark's load generator: publishers that replay pre-encoded, pre-packetised RTP, and subscribers
that count frames from RTP marker bits without decoding.

The clip (`make_clip`) is encoded once: 2 s of 640x480 VP8 at about 800 kbit/s (aiortc's own encoder, a
keyframe first, 59 deltas), packetised once with aiortc's VP8 packetiser, plus one 20 ms Opus frame. A
publisher (`Publisher`) rides an aiortc peer connection for ICE and DTLS-SRTP only: its senders' tracks never
yield (aiortc's encoder never runs), and it writes each packet itself with fresh SSRC/sequence/timestamp/picture
id, SRTP-protected by the connection's own session, straight into the nominated ICE pair's UDP socket. The clip
loops; a PLI or FIR from the server restarts it at its keyframe on the next frame. Timestamps advance by exactly
one frame (3000 at 90 kHz) per frame sent. Why not aiortc's sender with a track yielding `av.Packet`s: it
repacketises and builds an `RtpPacket` per packet, measured here at 95-185 us of CPU per frame before SRTP
against 7-14 us for these pre-built packets (3000 frames/s at N=50 would cost it a third to a half of the
generator's core).

A subscriber (`Inbound`) takes over the same connection's receive path: SRTP datagrams are unprotected in the
socket's callback and only their RTP header and VP8 payload descriptor are read, so no jitter buffer, depayloader
or decoder thread runs (`quiet_decoders` makes aiortc's decoder thread return at once). Frames are counted from
the first keyframe on (`VideoCounter`).
"""

from __future__ import annotations

import asyncio
import contextlib
import fractions
import math
import random
import re
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec

FPS = 30
VIDEO_CLOCK = 90_000
FRAME_TICKS = VIDEO_CLOCK // FPS  # 3000: the timestamp step of one frame
AUDIO_TICKS = 960  # 20 ms of Opus at 48 kHz
WIDTH, HEIGHT = 640, 480
CLIP_FRAMES = 2 * FPS  # a keyframe every 2 s when looped
BITRATE = 800_000
ENCODER_TARGET = 840_000  # libvpx's CBR lands a little under its target: this gives the clip about 800 kbit/s
FIXTURES = Path(__file__).resolve().parent / "fixtures"
CLIP_FILE = FIXTURES / f"sfu_clip_vp8_{WIDTH}x{HEIGHT}_{BITRATE // 1000}k.msgpack"

RECEIVE_BUFFER = 4 * 1024 * 1024  # the kernel caps it at net.core.rmem_max
RECEIVE_SIZE = 2048  # larger than any datagram of ours (MTU-sized RTP + SRTP tag)
DRAIN_BATCH = 64  # datagrams read per readiness before the loop runs its timers again
_RTP_HEADER = struct.Struct("!BBHII")
RTCP_PSFB, RTCP_RTPFB = 206, 205
PSFB_PLI, PSFB_FIR = 1, 4


# --- the clip ----------------------------------------------------------------------------------


class Clip(msgspec.Struct, frozen=True):
    video: list[list[bytes]]  # frame → its VP8 RTP payloads (payload descriptor + data); frame 0 a keyframe
    audio: bytes  # one 20 ms Opus frame

    def bitrate(self) -> float:
        return sum(len(p) for frame in self.video for p in frame) * 8 * FPS / len(self.video)


def _texture(rng: random.Random, width: int, height: int) -> bytes:
    """A blocky luma texture with light noise, panned across the frame: motion the encoder works for."""
    blocks = [[rng.randrange(40, 216) for _ in range(width // 16 + 1)] for _ in range(height // 16 + 1)]
    out = bytearray(width * height)
    for y in range(height):
        row = blocks[y // 16]
        base = y * width
        for x in range(width):
            out[base + x] = (row[x // 16] + rng.randrange(-6, 7)) & 0xFF
    return bytes(out)


def make_clip() -> Clip:
    """Encode the clip (a few seconds of CPU). The encoder runs 3 s of frames first so that its rate control
    has settled when the clip's keyframe is forced."""
    from aiortc.codecs.opus import OpusEncoder
    from aiortc.codecs.vpx import Vp8Encoder
    from av import AudioFrame, VideoFrame

    rng = random.Random(17)
    pad = 256
    tex_w, tex_h = WIDTH + pad, HEIGHT + pad
    texture = _texture(rng, tex_w, tex_h)
    chroma = bytes([128]) * (WIDTH * HEIGHT // 4)
    encoder = Vp8Encoder()
    encoder.target_bitrate = ENCODER_TARGET
    warm = 3 * FPS
    frames: list[list[bytes]] = []
    for i in range(warm + CLIP_FRAMES):
        dx, dy = (i * 3) % pad, (i * 2) % pad
        luma = b"".join(texture[(r + dy) * tex_w + dx:(r + dy) * tex_w + dx + WIDTH] for r in range(HEIGHT))
        frame = VideoFrame(WIDTH, HEIGHT, "yuv420p")
        frame.planes[0].update(luma)
        frame.planes[1].update(chroma)
        frame.planes[2].update(chroma)
        frame.pts = i * FRAME_TICKS
        frame.time_base = fractions.Fraction(1, VIDEO_CLOCK)
        payloads, _ = encoder.encode(frame, force_keyframe=i in (0, warm))
        if i >= warm:
            frames.append(payloads)
    if not vp8_keyframe(frames[0][0]) or any(vp8_keyframe(f[0]) for f in frames[1:]):
        raise RuntimeError("the clip must hold exactly one keyframe, first")

    opus = OpusEncoder()
    opus.codec.bit_rate = 32_000  # a voice call's rate, as browsers send it
    samples = 960
    packets: list[bytes] = []
    for i in range(10):  # a 440 Hz tone; the encoder's first packets are its start-up
        pcm = bytearray()
        for n in range(samples):
            v = int(8000 * math.sin(2 * math.pi * 440 * (i * samples + n) / 48_000))
            pcm += struct.pack("<hh", v, v)
        af = AudioFrame(format="s16", layout="stereo", samples=samples)
        af.planes[0].update(bytes(pcm))
        af.sample_rate = 48_000
        af.pts = i * samples
        af.time_base = fractions.Fraction(1, 48_000)
        out, _ = opus.encode(af)
        packets += out
    return Clip(video=frames, audio=packets[-1])


def load_clip(path: Path = CLIP_FILE) -> Clip:
    """The clip from bench/fixtures, encoded and written there on first use."""
    if path.exists():
        return msgspec.msgpack.decode(path.read_bytes(), type=Clip)
    clip = make_clip()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(msgspec.msgpack.encode(clip))
    return clip


# --- RTP pieces ---------------------------------------------------------------------------------


def vp8_descriptor(payload: bytes | memoryview) -> tuple[bool, int]:
    """(starts a frame, offset of the VP8 payload) from an RTP payload's VP8 descriptor (RFC 7741 4.2)."""
    b0 = payload[0]
    pos = 1
    if b0 & 0x80:
        ext = payload[1]
        pos = 2
        if ext & 0x80:
            pos += 2 if payload[pos] & 0x80 else 1
        if ext & 0x40:
            pos += 1
        if ext & 0x30:
            pos += 1
    return bool(b0 & 0x10) and (b0 & 0x0F) == 0, pos


def vp8_keyframe(payload: bytes | memoryview) -> bool:
    """Whether this RTP payload starts a VP8 keyframe (the P bit of the first payload header byte is 0)."""
    start, pos = vp8_descriptor(payload)
    return start and len(payload) > pos and not payload[pos] & 0x01


def mid_extension(ext_id: int, mid: str) -> bytes:
    """A one-byte-header RTP extension block carrying the MID (RFC 8285), padded to 32 bits."""
    value = mid.encode()
    body = bytes([(ext_id << 4) | (len(value) - 1)]) + value
    body += b"\0" * (-len(body) % 4)
    return struct.pack("!HH", 0xBEDE, len(body) // 4) + body


class Packetiser:
    """One stream's outgoing RTP: fresh sequence numbers and timestamps on pre-built payloads."""

    def __init__(self, payload_type: int, ssrc: int, extension: bytes, rng: random.Random) -> None:
        self.payload_type = payload_type
        self.ssrc = ssrc
        self.extension = extension
        self.first_byte = 0x90 if extension else 0x80
        self.seq = rng.randrange(0, 1 << 15)
        self.timestamp = rng.randrange(0, 1 << 32)
        self.picture_id = rng.randrange(0, 1 << 15)

    def video_frame(self, payloads: list[bytes]) -> list[bytes]:
        """The RTP packets of one VP8 frame: marker on the last, the picture id rewritten (aiortc's packetiser
        writes the long 15-bit form at bytes 2-3)."""
        pid = struct.pack("!H", 0x8000 | self.picture_id)
        last = len(payloads) - 1
        out = []
        for i, payload in enumerate(payloads):
            header = _RTP_HEADER.pack(self.first_byte, (0x80 if i == last else 0) | self.payload_type,
                                      self.seq, self.timestamp, self.ssrc)
            out.append(b"".join((header, self.extension, payload[:2], pid, payload[4:])))
            self.seq = (self.seq + 1) & 0xFFFF
        self.timestamp = (self.timestamp + FRAME_TICKS) & 0xFFFFFFFF
        self.picture_id = (self.picture_id + 1) & 0x7FFF
        return out

    def audio_frame(self, payload: bytes, first: bool) -> bytes:
        header = _RTP_HEADER.pack(self.first_byte, (0x80 if first else 0) | self.payload_type, self.seq,
                                  self.timestamp, self.ssrc)
        self.seq = (self.seq + 1) & 0xFFFF
        self.timestamp = (self.timestamp + AUDIO_TICKS) & 0xFFFFFFFF
        return b"".join((header, self.extension, payload))


def rtp_payload_offset(packet: bytes) -> int:
    """Where the payload of a plain RTP packet starts (after CSRCs and any header extension)."""
    pos = 12 + 4 * (packet[0] & 0x0F)
    if packet[0] & 0x10:
        pos += 4 + 4 * struct.unpack_from("!H", packet, pos + 2)[0]
    return pos


def rtcp_feedback(packet: bytes) -> tuple[int, int]:
    """(PLI/FIR count, NACK count) in a compound RTCP packet."""
    keyframes = nacks = 0
    pos = 0
    while pos + 4 <= len(packet):
        fmt = packet[pos] & 0x1F
        pt = packet[pos + 1]
        length = struct.unpack_from("!H", packet, pos + 2)[0]
        if pt == RTCP_PSFB and fmt in (PSFB_PLI, PSFB_FIR):
            keyframes += 1
        elif pt == RTCP_RTPFB and fmt == 1:
            nacks += 1
        pos += 4 * (length + 1)
    return keyframes, nacks


@dataclass
class VideoCounter:
    """Frames of one inbound VP8 stream, counted from RTP headers from the first keyframe on.

    A frame is complete when its packets came from the one that starts it (S=1, PID=0) to the one with the
    marker bit, with no sequence gap. Frames expected run from the first keyframe's timestamp to the last
    complete frame's, one per 3000 ticks: expected - complete is the frames lost after the first keyframe
    (frames a server dropped, packets lost, frames cut short)."""

    first_frame_at: float | None = None  # when the first keyframe was complete
    frames: int = 0  # complete frames since the first keyframe
    packets: int = 0
    lost_packets: int = 0
    late_packets: int = 0  # duplicates or out of order
    _started: bool = False
    _seq: int = 0
    _ts: int = 0  # the current frame's timestamp (wire value)
    _ts_ext: int = 0  # ... unwrapped, relative to the first keyframe's
    _last_complete_ext: int = 0
    _ok: bool = False

    def packet(self, seq: int, timestamp: int, marker: bool, payload: bytes | memoryview, now: float) -> None:
        if not self._started:
            if not payload or not vp8_keyframe(payload):
                return
            self._started = True
            self._seq = (seq - 1) & 0xFFFF
            self._ts = timestamp
            self._ok = True
        step = (seq - self._seq) & 0xFFFF
        if step == 0 or step > 0x8000:
            self.late_packets += 1
            return
        self.packets += 1
        gap = step > 1
        if gap:
            self.lost_packets += step - 1
        self._seq = seq
        if timestamp != self._ts:
            delta = (timestamp - self._ts) & 0xFFFFFFFF
            self._ts_ext += delta - (1 << 32) if delta > 0x7FFFFFFF else delta
            self._ts = timestamp
            self._ok = bool(payload) and vp8_descriptor(payload)[0]
        elif gap:
            self._ok = False
        if marker:
            if self._ok:
                self.frames += 1
                self._last_complete_ext = self._ts_ext
                if self.first_frame_at is None:
                    self.first_frame_at = now
            self._ok = False

    @property
    def expected(self) -> int:
        return round(self._last_complete_ext / FRAME_TICKS) + 1 if self.frames else 0

    @property
    def lost_frames(self) -> int:
        return max(0, self.expected - self.frames)


@dataclass
class AudioCounter:
    packets: int = 0
    lost_packets: int = 0
    _seq: int | None = None

    def packet(self, seq: int) -> None:
        self.packets += 1
        if self._seq is not None:
            step = (seq - self._seq) & 0xFFFF
            if step > 0x8000 or step == 0:
                return
            self.lost_packets += step - 1
        self._seq = seq


# --- aiortc plumbing ----------------------------------------------------------------------------


def use_host_addresses(addresses: list[str]) -> None:
    """Gather host candidates only on these addresses (aioice leaves 127.0.0.1 out on its own)."""
    import aioice.ice

    def host_addresses(use_ipv4: bool, use_ipv6: bool) -> list[str]:
        return list(addresses)

    aioice.ice.get_host_addresses = host_addresses


def quiet_decoders() -> None:
    """aiortc starts a decoder thread per receiver; make it end at once (frames are never handed to it)."""
    import aiortc.rtcrtpreceiver

    def no_decoder(loop: Any, input_q: Any, output_q: Any, decode_error: Any) -> None:
        return None

    aiortc.rtcrtpreceiver.decoder_worker = no_decoder


def sdp_payload_types(sdp: str) -> dict[str, int]:
    """{"vp8", "opus", "rtx" (VP8's), "mid_ext"} from an SDP (first of each), as far as present."""
    found: dict[str, int] = {}
    vp8 = re.search(r"a=rtpmap:(\d+) VP8/90000", sdp, re.I)
    if vp8:
        found["vp8"] = int(vp8.group(1))
        rtx = re.search(rf"a=fmtp:(\d+) apt={vp8.group(1)}\b", sdp)
        if rtx:
            found["rtx"] = int(rtx.group(1))
    opus = re.search(r"a=rtpmap:(\d+) opus/48000", sdp, re.I)
    if opus:
        found["opus"] = int(opus.group(1))
    mid = re.search(r"a=extmap:(\d+)(?:/\w+)? urn:ietf:params:rtp-hdrext:sdes:mid", sdp)
    if mid:
        found["mid_ext"] = int(mid.group(1))
    return found


def new_peer_connection() -> Any:
    from aiortc import RTCBundlePolicy, RTCConfiguration, RTCPeerConnection

    return RTCPeerConnection(RTCConfiguration(iceServers=[], bundlePolicy=RTCBundlePolicy.MAX_BUNDLE))


def idle_track(kind: str) -> Any:
    """A track whose recv() never returns: the sender's RTP task waits on it forever, nothing encodes."""
    from aiortc.mediastreams import MediaStreamTrack

    class IdleTrack(MediaStreamTrack):
        def __init__(self) -> None:
            super().__init__()
            self.kind = kind

        async def recv(self) -> Any:
            await asyncio.get_running_loop().create_future()

    return IdleTrack()


def prefer_codecs(pc: Any) -> None:
    """VP8 (and its RTX) and Opus only, so that both legs of the server carry the same codec."""
    from aiortc import RTCRtpSender

    for transceiver in pc.getTransceivers():
        caps = RTCRtpSender.getCapabilities(transceiver.kind).codecs
        wanted = ("video/vp8", "video/rtx") if transceiver.kind == "video" else ("audio/opus",)
        transceiver.setCodecPreferences([c for c in caps if c.mimeType.lower() in wanted])


@dataclass
class Inbound:
    """What one peer connection receives: video frames by marker bits, audio packets, keyframe requests."""

    video_pt: int | None = None
    rtx_pt: int | None = None
    audio_pt: int | None = None
    video: VideoCounter = field(default_factory=VideoCounter)
    audio: AudioCounter = field(default_factory=AudioCounter)
    rtx_packets: int = 0
    other_packets: int = 0
    keyframe_requests: int = 0
    nacks: int = 0
    srtp_errors: int = 0
    on_keyframe_request: Callable[[], None] | None = None

    def rtp(self, packet: bytes) -> None:
        if len(packet) < 12:
            return
        pt = packet[1] & 0x7F
        if pt == self.video_pt:
            seq, timestamp = struct.unpack_from("!HI", packet, 2)
            self.video.packet(seq, timestamp, bool(packet[1] & 0x80), memoryview(packet)[rtp_payload_offset(packet):],
                              time.monotonic())
        elif pt == self.audio_pt:
            self.audio.packet(struct.unpack_from("!H", packet, 2)[0])
        elif pt == self.rtx_pt:
            self.rtx_packets += 1
        else:
            self.other_packets += 1

    def rtcp(self, packet: bytes) -> None:
        keyframes, nacks = rtcp_feedback(packet)
        self.nacks += nacks
        if keyframes:
            self.keyframe_requests += keyframes
            if self.on_keyframe_request is not None:
                self.on_keyframe_request()


def hook_receive(dtls: Any, inbound: Inbound) -> None:
    """Route a DTLS transport's decrypted RTP/RTCP to `inbound` instead of aiortc's receivers (used until the
    socket fast path of `fast_path` is in place: the first packets may arrive before it)."""

    async def handle_rtp(data: bytes, arrival_time_ms: int) -> None:
        inbound.rtp(data)

    async def handle_rtcp(data: bytes) -> None:
        inbound.rtcp(data)

    dtls._handle_rtp_data = handle_rtp
    dtls._handle_rtcp_data = handle_rtcp


class FastPath:
    """The nominated ICE pair's socket, used directly: SRTP datagrams are unprotected in the socket callback and
    handed to `inbound`; `send` protects and writes without a coroutine or queue in between."""

    def __init__(self, dtls: Any, inbound: Inbound) -> None:
        import pylibsrtp

        pair = dtls.transport._connection._nominated[1]
        sock = pair.protocol.transport.get_extra_info("socket")
        if sock is not None:  # a client's worth of buffer: a generator preempted for a moment must not drop
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECEIVE_BUFFER)
        self._rx = dtls._rx_srtp
        self._tx = dtls._tx_srtp
        self._udp = pair.protocol.transport
        self._addr = pair.remote_addr
        self._inbound = inbound
        self._errors = pylibsrtp.Error
        protocol = pair.protocol
        original = protocol.datagram_received

        def datagram_received(data: bytes, addr: tuple[Any, ...]) -> None:
            first = data[0] if data else 0
            if 127 < first < 192:
                try:
                    if 192 <= data[1] <= 223:  # RTCP packet types 192-223 (RFC 5761)
                        inbound.rtcp(self._rx.unprotect_rtcp(data))
                    else:
                        inbound.rtp(self._rx.unprotect(data))
                except self._errors:
                    inbound.srtp_errors += 1
            else:
                original(data, addr)

        protocol.datagram_received = datagram_received
        raw = getattr(self._udp, "_sock", None)
        loop = asyncio.get_running_loop()
        if raw is not None and hasattr(loop, "_add_reader"):
            # asyncio's datagram transport reads one datagram per readiness; drain the socket instead (the
            # selector loop's own transport-level reader calls: the public ones refuse a transport's fd)

            def drain() -> None:
                for _ in range(DRAIN_BATCH):
                    try:
                        data, addr = raw.recvfrom(RECEIVE_SIZE)
                    except (BlockingIOError, InterruptedError):
                        return
                    except OSError:  # ICMP unreachable and the like: asyncio would only report it
                        return
                    datagram_received(data, addr)

            selector: Any = loop
            selector._remove_reader(raw.fileno())  # the transport's close() removes ours by the same fd
            selector._add_reader(raw.fileno(), drain)

    def send(self, packet: bytes) -> None:
        if self._udp.is_closing():  # ICE gave up on the pair (consent lost) or the connection closed
            raise ConnectionError("the connection's socket is closed")
        self._udp.sendto(self._tx.protect(packet), self._addr)


class LoopLag:
    """How late this event loop runs a 10 ms timer: the worst in a window says whether the generator itself
    stalled (preempted on a busy core, a collector pause, a setup's blocking step)."""

    def __init__(self) -> None:
        self.worst = 0.0
        self._loop = asyncio.get_running_loop()
        self._due = self._loop.time() + 0.01
        self._handle = self._loop.call_at(self._due, self._tick)

    def _tick(self) -> None:
        now = self._loop.time()
        self.worst = max(self.worst, now - self._due)
        self._due = now + 0.01
        self._handle = self._loop.call_at(self._due, self._tick)

    def take(self) -> float:
        worst, self.worst = self.worst, 0.0
        return worst

    def close(self) -> None:
        self._handle.cancel()


class Publisher:
    """Replays the clip's video at 30 fps and its Opus frame every 20 ms over one connection."""

    def __init__(self, clip: Clip, path: FastPath, video: Packetiser, audio: Packetiser | None) -> None:
        self.clip = clip
        self.path = path
        self.video = video
        self.audio = audio
        self.index = 0
        self.frames_sent = 0
        self.keyframes_sent = 0
        self.dropped = False  # its connection went away mid-run
        self._keyframe_wanted = False
        self._closed = False
        self._loop = asyncio.get_running_loop()
        start = self._loop.time()  # the first frame at once, as a client does; connections spread the phases
        self._video_next = start
        self._audio_next = start
        self._audio_first = True
        self._loop.call_at(start, self._video_tick)
        if audio is not None:
            self._loop.call_at(start, self._audio_tick)

    def request_keyframe(self) -> None:
        self._keyframe_wanted = True

    def close(self) -> None:
        self._closed = True

    def _video_tick(self) -> None:
        if self._closed:
            return
        if self._keyframe_wanted:
            self._keyframe_wanted = False
            self.index = 0
        if self.index == 0:
            self.keyframes_sent += 1
        try:
            for packet in self.video.video_frame(self.clip.video[self.index]):
                self.path.send(packet)
        except ConnectionError:
            self.dropped = True
            return
        except OSError:
            pass  # a full socket buffer drops like the network would; the counters show it
        self.index = (self.index + 1) % len(self.clip.video)
        self.frames_sent += 1
        self._video_next += 1 / FPS
        self._loop.call_at(self._video_next, self._video_tick)

    def _audio_tick(self) -> None:
        if self._closed or self.audio is None:
            return
        try:
            self.path.send(self.audio.audio_frame(self.clip.audio, self._audio_first))
        except ConnectionError:
            self.dropped = True
            return
        except OSError:
            pass
        self._audio_first = False
        self._audio_next += AUDIO_TICKS / 48_000
        self._loop.call_at(self._audio_next, self._audio_tick)
