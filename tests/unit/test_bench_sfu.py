"""The SFU benchmark's generator pieces: its packetiser and the marker-bit frame counter it trusts.

The clip is aiortc's own VP8 encoder output packetised by aiortc's own packetiser, so these tests read real
VP8 payloads, not hand-made bytes.
"""

from __future__ import annotations

import random
import struct

import pytest
from aiortc.codecs.vpx import Vp8Encoder
from aiortc.rtp import RtcpPacket, RtcpPsfbPacket, RtcpRtpfbPacket, RtpPacket

from bench.sfu_gen import (
    FRAME_TICKS,
    Clip,
    Packetiser,
    VideoCounter,
    make_clip,
    mid_extension,
    rtcp_feedback,
    rtp_payload_offset,
    sdp_payload_types,
    vp8_descriptor,
    vp8_keyframe,
)


@pytest.fixture(scope="module")
def clip() -> Clip:
    return make_clip()


def test_the_clip_is_one_keyframe_then_deltas_at_about_800_kbit(clip: Clip) -> None:
    assert len(clip.video) == 60
    assert vp8_keyframe(clip.video[0][0])
    assert not any(vp8_keyframe(frame[0]) for frame in clip.video[1:])
    assert all(vp8_descriptor(frame[0])[0] for frame in clip.video)  # each frame's first packet starts it
    assert not any(vp8_descriptor(p)[0] for frame in clip.video for p in frame[1:])
    assert 600_000 < clip.bitrate() < 1_000_000
    assert clip.audio


def test_packets_parse_as_rtp_with_fresh_numbers_marker_last_and_the_mid(clip: Clip) -> None:
    from aiortc.rtcrtpparameters import RTCRtpHeaderExtensionParameters, RTCRtpParameters
    from aiortc.rtp import HeaderExtensionsMap

    ext = mid_extension(3, "1")
    packetiser = Packetiser(97, 0x11223344, ext, random.Random(1))
    seq0, ts0 = packetiser.seq, packetiser.timestamp
    first = packetiser.video_frame(clip.video[0])
    second = packetiser.video_frame(clip.video[1])
    extensions = HeaderExtensionsMap()
    extensions.configure(RTCRtpParameters(headerExtensions=[
        RTCRtpHeaderExtensionParameters(id=3, uri="urn:ietf:params:rtp-hdrext:sdes:mid")]))
    parsed = [RtpPacket.parse(p, extensions) for p in first + second]
    assert [p.sequence_number for p in parsed] == [(seq0 + i) & 0xFFFF for i in range(len(parsed))]
    assert {p.timestamp for p in parsed[:len(first)]} == {ts0}
    assert {p.timestamp for p in parsed[len(first):]} == {(ts0 + FRAME_TICKS) & 0xFFFFFFFF}
    assert [p.marker for p in parsed[:len(first)]] == [0] * (len(first) - 1) + [1]
    assert all(p.ssrc == 0x11223344 and p.payload_type == 97 and p.extensions.mid == "1" for p in parsed)
    # the payload is the clip's, with the picture id rewritten and advancing per frame
    assert parsed[0].payload[4:] == clip.video[0][0][4:]
    pid = [struct.unpack_from("!H", p.payload, 2)[0] & 0x7FFF for p in (parsed[0], parsed[len(first)])]
    assert pid[1] == (pid[0] + 1) & 0x7FFF
    assert rtp_payload_offset(first[0]) == 12 + len(ext)


def test_the_counter_counts_complete_frames_from_the_first_keyframe(clip: Clip) -> None:
    packetiser = Packetiser(97, 1, b"", random.Random(2))
    counter = VideoCounter()
    for packet in packetiser.video_frame(clip.video[5]):  # deltas before any keyframe are not counted
        feed(counter, packet)
    assert counter.frames == 0
    assert counter.first_frame_at is None
    for frame in clip.video * 2:
        for packet in packetiser.video_frame(frame):
            feed(counter, packet)
    assert counter.frames == 120
    assert counter.expected == 120
    assert counter.lost_frames == 0
    assert counter.lost_packets == 0
    assert counter.first_frame_at is not None


def test_a_lost_packet_loses_its_frame_and_a_dropped_frame_counts_too(clip: Clip) -> None:
    packetiser = Packetiser(97, 1, b"", random.Random(3))
    counter = VideoCounter()
    frames = [packetiser.video_frame(f) for f in clip.video[:10]]
    frames[3] = frames[3][1:] if len(frames[3]) > 1 else frames[3][:0]  # frame 3 loses its first packet
    frames[6] = []  # frame 6 never arrives (a server dropped it)
    for packets in frames:
        for packet in packets:
            feed(counter, packet)
    assert counter.expected == 10
    assert counter.frames == 8
    assert counter.lost_frames == 2
    assert counter.lost_packets >= 2


def test_wrapping_sequence_numbers_and_timestamps_are_no_loss(clip: Clip) -> None:
    packetiser = Packetiser(97, 1, b"", random.Random(4))
    packetiser.seq, packetiser.timestamp = 0xFFFE, 0xFFFFFFFF - FRAME_TICKS
    counter = VideoCounter()
    for frame in clip.video[:5]:
        for packet in packetiser.video_frame(frame):
            feed(counter, packet)
    assert (counter.frames, counter.lost_frames, counter.lost_packets) == (5, 0, 0)


def test_a_duplicate_is_late_not_lost(clip: Clip) -> None:
    packetiser = Packetiser(97, 1, b"", random.Random(5))
    counter = VideoCounter()
    packets = [p for f in clip.video[:3] for p in packetiser.video_frame(f)]
    for packet in [*packets[:4], packets[2], *packets[4:]]:
        feed(counter, packet)
    assert (counter.frames, counter.lost_frames, counter.late_packets) == (3, 0, 1)


def test_rtcp_feedback_finds_pli_fir_and_nack_in_a_compound_packet() -> None:
    from aiortc.rtp import RTCP_PSFB_FIR, RTCP_PSFB_PLI, RTCP_RTPFB_NACK, RtcpReceiverInfo, RtcpRrPacket

    nack = RtcpRtpfbPacket(fmt=RTCP_RTPFB_NACK, ssrc=1, media_ssrc=2)
    nack.lost = [5, 6]
    compound = b"".join(bytes(p) for p in (
        RtcpRrPacket(ssrc=1, reports=[RtcpReceiverInfo(ssrc=2, fraction_lost=0, packets_lost=0, highest_sequence=1,
                                                       jitter=0, lsr=0, dlsr=0)]),
        RtcpPsfbPacket(fmt=RTCP_PSFB_PLI, ssrc=1, media_ssrc=2),
        RtcpPsfbPacket(fmt=RTCP_PSFB_FIR, ssrc=1, media_ssrc=2, fci=b"\0" * 8),
        nack,
    ))
    assert len(RtcpPacket.parse(compound)) == 4  # well-formed, as aiortc reads it
    assert rtcp_feedback(compound) == (2, 1)


def test_sdp_payload_types_from_an_aiortc_offer() -> None:
    sdp = ("m=audio 9 UDP/TLS/RTP/SAVPF 96\r\na=extmap:1 urn:ietf:params:rtp-hdrext:sdes:mid\r\n"
           "a=rtpmap:96 opus/48000/2\r\nm=video 9 UDP/TLS/RTP/SAVPF 97 98\r\n"
           "a=extmap:1 urn:ietf:params:rtp-hdrext:sdes:mid\r\na=rtpmap:97 VP8/90000\r\n"
           "a=rtpmap:98 rtx/90000\r\na=fmtp:98 apt=97\r\n")
    assert sdp_payload_types(sdp) == {"vp8": 97, "rtx": 98, "opus": 96, "mid_ext": 1}


def test_aiortc_packetiser_layout_the_picture_id_rewrite_relies_on() -> None:
    payloads = Vp8Encoder._packetize(b"\x10" * 3000, picture_id=0x1234)
    assert all(p[0] & 0x80 and p[1] == 0x80 and p[2] & 0x80 for p in payloads)  # X, I, 15-bit M form
    assert struct.unpack_from("!H", payloads[0], 2)[0] & 0x7FFF == 0x1234


def feed(counter: VideoCounter, packet: bytes) -> None:
    seq, timestamp = struct.unpack_from("!HI", packet, 2)
    counter.packet(seq, timestamp, bool(packet[1] & 0x80), packet[rtp_payload_offset(packet):], 0.0)
