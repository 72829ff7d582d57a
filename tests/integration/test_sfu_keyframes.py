"""Keyframes and feedback through the forwarding engine, with real aiortc peers (whose VP8 encoder makes a
keyframe only at the start and when asked): a late subscriber gets a keyframe at once and nothing before it;
subscribers' PLIs, NACKs and REMBs reach the publisher (NACKs answered from the SFU's buffer when it can); the
publisher hears receiver reports and the subscriber gets sender reports on the stream's own SSRC."""

from __future__ import annotations

import struct
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from aiortc.rtp import (
    RTCP_PSFB_APP,
    RTCP_RTPFB,
    RTCP_RTPFB_NACK,
    RtcpPsfbPacket,
    RtcpRrPacket,
    RtcpRtpfbPacket,
    RtcpSrPacket,
    pack_rtcp_packet,
    unpack_remb_fci,
)

from app.rtc.sfu.engine import Sfu
from app.rtc.sfu.forward import NACK_ANSWERS, RESEND_INTERVAL_MS, vp8_keyframe_start
from app.rtc.sfu.ice import loopback_candidates
from app.settings import Settings
from tests.integration.sfu_peers import Peer, call

LATE_JOIN_BOUND = 1.0  # seconds from a late subscriber's answer to its first decoded video frame (issue 17)


@pytest.fixture
async def sfu() -> AsyncIterator[Sfu]:
    with loopback_candidates():
        engine = Sfu(Settings(rtc_host_addresses="127.0.0.1", rtc_udp_ports="21700-21999"))
        yield engine
        await engine.close()


@pytest.fixture
def loopback() -> Iterator[None]:
    with loopback_candidates():
        yield


def video_receiver(peer: Peer) -> Any:
    return next(t.receiver for t in peer.pc.getTransceivers() if t.kind == "video")


async def test_a_late_subscriber_gets_video_within_a_second_and_no_frame_before_a_keyframe(sfu: Sfu) -> None:
    doctor, patient = Peer("doctor"), Peer("patient")
    try:
        await doctor.join(sfu, "room-late")
        # the doctor's only spontaneous keyframe is long gone: three seconds of deltas have reached the SFU
        await doctor.until(lambda: doctor.video.count >= 90, "90 frames sent")
        ingress = sfu.rooms["room-late"].participants["doctor"].ingress["video"]
        assert ingress.received >= 60
        assert doctor.keyframe_requests == 0
        answered = await patient.join(sfu, "room-late")
        await patient.frames_reach("video", 1)
        assert patient.first_frame_at["video"] - answered < LATE_JOIN_BOUND
        # the SFU asked the doctor's media SSRC (aiortc routes a PLI to its sender only by that SSRC) ...
        assert doctor.keyframe_requests >= 1
        assert ingress.keyframe_requests >= 1
        # ... and held the deltas back: the patient's first video packet opens a keyframe
        assert vp8_keyframe_start(patient.video_rtp[0][4])
        await patient.more_frames("video", 10)
    finally:
        await doctor.close()
        await patient.close()


async def test_a_subscribers_picture_loss_reaches_the_publisher_and_a_keyframe_comes_back(sfu: Sfu) -> None:
    doctor, patient = await call(sfu, "room-pli")
    try:
        await patient.more_frames("video", 15)
        requests, packets = doctor.keyframe_requests, len(patient.video_rtp)
        media_ssrc = patient.video_rtp[-1][0]
        await video_receiver(patient)._send_rtcp_pli(media_ssrc)  # what a stalled decoder makes aiortc send
        await doctor.until(lambda: doctor.keyframe_requests > requests, "the PLI relayed to the doctor")
        await patient.until(lambda: any(vp8_keyframe_start(p[4]) for p in patient.video_rtp[packets:]),
                            "a keyframe after the PLI")
    finally:
        await doctor.close()
        await patient.close()


async def test_a_lost_packet_is_retransmitted_from_the_sfus_buffer(sfu: Sfu) -> None:
    doctor, patient = await call(sfu, "room-nack")
    try:
        await patient.more_frames("video", 10)
        media_pt = patient.video_rtp[-1][1]
        lost: list[int] = []

        def drop_one(packet: Any) -> bool:  # lose the next media packet on the way into the patient
            if not lost and packet.payload_type == media_pt:
                lost.append(packet.sequence_number)
                return True
            return False

        patient.drop_video = drop_one
        # aiortc's receiver NACKs the gap; the SFU resends the packet as RTX (its own RTX SSRC and payload type)
        await patient.until(lambda: bool(lost) and any(p[1] != media_pt and p[4][:2] == lost[0].to_bytes(2, "big")
                                                       for p in patient.video_rtp), "the retransmission")
        egress = sfu.rooms["room-nack"].participants["patient"].egress["video"]
        assert egress.retransmitted >= 1
        assert doctor.retransmit_requests == []  # answered by the SFU, not the doctor
        await patient.more_frames("video", 10)
    finally:
        await doctor.close()
        await patient.close()


async def test_a_nack_for_what_the_sfu_does_not_hold_is_relayed_in_the_publishers_numbers(sfu: Sfu) -> None:
    doctor, patient = await call(sfu, "room-nack-relay")
    try:
        await patient.more_frames("video", 5)
        egress = sfu.rooms["room-nack-relay"].participants["patient"].egress["video"]
        ssrc, _, last_seq, _, _ = patient.video_rtp[-1]
        ahead = (last_seq + 200) & 0xFFFF  # not sent yet, so not in the buffer
        receiver = video_receiver(patient)
        await receiver._send_rtcp_nack(ssrc, [ahead])
        expected = (ahead - egress.rewriter.seq_offset) & 0xFFFF
        await doctor.until(lambda: expected in doctor.retransmit_requests, "the NACK relayed to the doctor")
    finally:
        await doctor.close()
        await patient.close()


async def test_reports_and_bitrate_feedback_flow_both_ways(sfu: Sfu) -> None:
    doctor, patient = await call(sfu, "room-rtcp")
    try:
        doctor_ssrc = next(t.sender._ssrc for t in doctor.pc.getTransceivers() if t.kind == "video")

        def reported() -> bool:
            return any(isinstance(p, RtcpRrPacket) and any(r.ssrc == doctor_ssrc for r in p.reports)
                       for p in doctor.sender_rtcp)

        def remb() -> bool:
            return any(isinstance(p, RtcpPsfbPacket) and p.fmt == RTCP_PSFB_APP
                       and doctor_ssrc in unpack_remb_fci(p.fci)[1] for p in doctor.sender_rtcp)

        await doctor.until(reported, "a receiver report about the doctor's video")
        await doctor.until(remb, "a REMB for the doctor's video")
        # the patient gets sender reports on the SSRC its video arrives on, in that stream's timestamps
        stream_ssrc = patient.video_rtp[-1][0]
        await patient.until(lambda: any(isinstance(p, RtcpSrPacket) and p.ssrc == stream_ssrc
                                        for p in patient.receiver_rtcp), "a sender report")
        report = next(p for p in patient.receiver_rtcp if isinstance(p, RtcpSrPacket))
        timestamps = [p[3] for p in patient.video_rtp]
        assert min((report.sender_info.rtp_timestamp - ts) & 0xFFFFFFFF for ts in timestamps) < 90000 * 3
    finally:
        await doctor.close()
        await patient.close()


def media_seqs(peer: Peer) -> list[int]:
    """The sequence numbers of the video media packets (not RTX) the peer received, in order."""
    media_pt = peer.video_rtp[0][1]  # the first is media: nothing was lost yet to retransmit
    return [p[2] for p in peer.video_rtp if p[1] == media_pt]


async def test_a_nack_full_of_repeats_resends_at_most_the_cap(sfu: Sfu) -> None:
    doctor, patient = await call(sfu, "room-nack-flood")
    try:
        await patient.until(lambda: len(media_seqs(patient)) >= 100, "100 video packets")
        egress = sfu.rooms["room-nack-flood"].participants["patient"].egress["video"]
        ssrc = patient.video_rtp[-1][0]
        held = media_seqs(patient)[-100:]  # all still in the SFU's buffer
        # ~1.2 KB of NACK: 300 entries each asking for 17 packets, all repeats of the same 116
        fci = b"".join(struct.pack("!HH", seq, 0xFFFF) for _ in range(3) for seq in held)
        nack = pack_rtcp_packet(RTCP_RTPFB, RTCP_RTPFB_NACK, struct.pack("!LL", 1, ssrc) + fci)
        assert len(RtcpRtpfbPacket.parse(nack[4:], RTCP_RTPFB_NACK).lost) == 300 * 17
        before = egress.retransmitted
        receiver = video_receiver(patient)
        await receiver.transport._send_rtp(nack)
        # then one for a packet not sent yet, relayed to the doctor: the SFU handles a leg's RTCP in order, so once
        # it arrives the flood has been answered
        ahead = (held[-1] + 200) & 0xFFFF
        await receiver._send_rtcp_nack(ssrc, [ahead])
        expected = (ahead - egress.rewriter.seq_offset) & 0xFFFF
        await doctor.until(lambda: expected in doctor.retransmit_requests, "the NACK relayed to the doctor")
        assert 0 < egress.retransmitted - before <= NACK_ANSWERS
        await patient.more_frames("video", 5)  # the call goes on
    finally:
        await doctor.close()
        await patient.close()


async def test_a_packet_is_resent_at_most_once_per_interval(sfu: Sfu) -> None:
    doctor, patient = await call(sfu, "room-nack-again")
    try:
        await patient.until(lambda: len(media_seqs(patient)) >= 5, "5 video packets")
        egress = sfu.rooms["room-nack-again"].participants["patient"].egress["video"]
        held = media_seqs(patient)[-3:]
        start = egress.retransmitted
        # the packet path's clock is given, so the interval is exact; nothing else runs between these calls
        egress._answer_nack(held, now_ms=1_000_000)
        assert egress.retransmitted == start + 3
        egress._answer_nack(held * 5, now_ms=1_000_000 + RESEND_INTERVAL_MS - 1)
        assert egress.retransmitted == start + 3  # too soon: each is on its way already
        egress._answer_nack(held, now_ms=1_000_000 + RESEND_INTERVAL_MS)
        assert egress.retransmitted == start + 6
    finally:
        await doctor.close()
        await patient.close()
