"""The forwarding engine with real aiortc peers on 127.0.0.1: media both ways, forwarded without decoding,
negotiation (sendrecv, one codec per kind, H.264 when both have it), reconnects, the 1:1 limit, host candidates
and ports, and nothing left behind after many calls. The private aiortc/aioice hooks the engine relies on are
asserted here, so a change under them fails these tests rather than a call."""

from __future__ import annotations

import asyncio
import gc
import itertools
import os
import re
import struct
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiortc import RTCPeerConnection, RTCSessionDescription

from app.errors import Invalid
from app.rtc.sfu.engine import ENDED_ROOMS_MAX, CallEnded, CodecUnsupported, RoomFull, Sfu
from app.rtc.sfu.forward import Egress, Ingress
from app.rtc.sfu.ice import PortsExhausted, loopback_candidates
from app.settings import Settings
from tests.integration.sfu_peers import Peer, call

PORTS = (21100, 21599)  # below the ephemeral range: no client socket lands in it


def sfu_settings(**changes: Any) -> Settings:
    given: dict[str, Any] = {"rtc_host_addresses": "127.0.0.1", "rtc_udp_ports": f"{PORTS[0]}-{PORTS[1]}"}
    given.update(changes)
    return Settings(**given)


@pytest.fixture
def loopback() -> Iterator[None]:
    with loopback_candidates():  # the clients' host candidate; the SFU sets its own
        yield


@pytest.fixture
async def sfu(loopback: None) -> AsyncIterator[Sfu]:
    engine = Sfu(sfu_settings())
    yield engine
    await engine.close()


async def closing(*peers: Peer) -> None:
    for peer in peers:
        await peer.close()


def candidates(sdp: str) -> list[tuple[str, int]]:
    return [(m[0], int(m[1])) for m in re.findall(r"a=candidate:\S+ \d+ udp \d+ (\S+) (\d+) typ host", sdp)]


def decoder_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.endswith("-decoder")]


async def test_each_side_receives_the_others_audio_and_video_without_the_sfu_decoding(sfu: Sfu) -> None:
    doctor, patient = await call(sfu, "room-1")
    try:
        for peer in (doctor, patient):
            await peer.more_frames("video", 20)
            await peer.more_frames("audio", 20)
        # every decoder thread is a client's (two receivers each); the SFU's receivers never started one
        assert len(decoder_threads()) == 4
        room = sfu.rooms["room-1"]
        for participant in room.participants.values():
            for transceiver in participant.pc.getTransceivers():
                receiver, sender = transceiver.receiver, transceiver.sender
                assert receiver._RTCRtpReceiver__decoder_thread is None  # hook: aiortc's receive() not run
                assert sender._RTCRtpSender__rtp_task is None  # hook: aiortc's send() (encoder loop) not run
                router = receiver.transport._rtp_router
                ingress = participant.ingress[transceiver.kind]
                egress = participant.egress[transceiver.kind]
                assert ingress in router.receivers
                assert isinstance(ingress, Ingress)
                assert router.senders[sender._ssrc] is egress
                assert isinstance(egress, Egress)
                assert egress.packets > 0
                assert ingress.received > 0
            # the packets came by the fast path (the socket's callback), not through aiortc's queue and task
            assert participant.leg is not None
            slow = participant.leg.dtls._RTCDtlsTransport__rx_packets  # what aiortc's receive loop saw
            assert participant.leg.fast_packets > 2 * slow, (participant.leg.fast_packets, slow)
        assert sfu.load().streams == 4
    finally:
        await closing(doctor, patient)


async def test_the_answer_is_sendrecv_on_the_offered_transceivers_with_one_codec_per_kind(sfu: Sfu) -> None:
    pc = RTCPeerConnection()
    pc.addTransceiver("audio", direction="sendrecv")
    pc.addTransceiver("video", direction="sendrecv")
    try:
        await pc.setLocalDescription(await pc.createOffer())
        offer = pc.localDescription.sdp
        assert "H264" in offer
        assert "VP8" in offer
        answer, type_ = await sfu.offer("room-sdp", "doctor", offer)
        assert type_ == "answer"
        sections = answer.split("m=")[1:]
        assert [s.split()[0] for s in sections] == ["audio", "video"]
        for section in sections:
            assert "a=sendrecv" in section
            assert re.search(r"a=ssrc:\d+ cname:", section)  # the SSRC we forward the other side's media on
        audio, video = sections
        assert re.findall(r"a=rtpmap:\d+ (\S+)", audio) == ["opus/48000/2"]
        assert re.findall(r"a=rtpmap:\d+ (\S+)", video) == ["VP8/90000", "rtx/90000"]
        await pc.setRemoteDescription(RTCSessionDescription(sdp=answer, type=type_))
    finally:
        await pc.close()


async def test_h264_when_preferred_and_both_offer_it(loopback: None) -> None:
    engine = Sfu(sfu_settings(rtc_video_codecs="H264,VP8"))
    doctor = patient = None
    try:
        doctor, patient = await call(engine, "room-h264")
        codec = engine.rooms["room-h264"].codecs["video"]
        assert codec.mimeType == "video/H264"
        for peer in (doctor, patient):
            await peer.more_frames("video", 10)
        # a newcomer that cannot send H.264 is refused rather than left without video
        late = Peer("late-vp8", video_codec="video/VP8")
        try:
            with pytest.raises(CodecUnsupported):
                await late.join(engine, "room-h264", participant="doctor")
        finally:
            await late.close()
    finally:
        await closing(*(p for p in (doctor, patient) if p is not None))
        await engine.close()


async def test_a_third_participant_is_refused(sfu: Sfu) -> None:
    doctor, patient = await call(sfu, "room-full")
    third = Peer("third")
    try:
        with pytest.raises(RoomFull) as refused:
            await third.join(sfu, "room-full")
        assert refused.value.extra["reason"] == "room_full"
        assert refused.value.status_code == 409
        assert len(sfu.rooms["room-full"].participants) == 2
        await doctor.more_frames("video", 5)  # the call itself goes on
    finally:
        await closing(doctor, patient, third)


async def test_a_second_offer_replaces_the_connection_and_media_keeps_flowing(sfu: Sfu) -> None:
    doctor, patient = await call(sfu, "room-re")
    new_doctor = Peer("doctor")
    try:
        await patient.more_frames("video", 10)
        old_pc = sfu.rooms["room-re"].participants["doctor"].pc
        before = patient.frames["video"]
        await new_doctor.join(sfu, "room-re")  # a network change: a new connection, a new SSRC upstream
        assert old_pc.connectionState == "closed"
        await doctor.close()
        await patient.frames_reach("video", before + 30)
        await new_doctor.frames_reach("video", 10)  # and the new connection receives the patient
        await new_doctor.frames_reach("audio", 10)
        # one stream for the patient: one SSRC, sequence numbers without a hole across the switch, time going on
        media_pt = patient.video_rtp[0][1]
        seen = [p for p in patient.video_rtp if p[1] == media_pt]  # RTX retransmissions have their own
        assert len({ssrc for ssrc, *_ in seen}) == 1
        gaps = [(b[2] - a[2]) & 0xFFFF for a, b in itertools.pairwise(seen)]
        assert max(gaps) == 1, gaps
        steps = [(b[3] - a[3]) & 0xFFFFFFFF for a, b in itertools.pairwise(seen)]
        assert max(steps) < 90000 * 5, steps  # no jump back (a huge unsigned step) or ahead
    finally:
        await closing(doctor, patient, new_doctor)


async def test_host_candidates_are_exactly_the_configured_ones_in_the_port_range() -> None:
    # no loopback_candidates() here: the process-wide aioice list has no 127.0.0.1, the SFU offers it anyway
    engine = Sfu(sfu_settings(rtc_udp_ports="21600-21609"))
    pc = RTCPeerConnection()
    pc.addTransceiver("audio", direction="sendrecv")
    pc.addTransceiver("video", direction="sendrecv")
    try:
        await pc.setLocalDescription(await pc.createOffer())
        answer, _ = await engine.offer("room-ice", "doctor", pc.localDescription.sdp)
        found = candidates(answer)
        assert found
        assert {host for host, _ in found} == {"127.0.0.1"}
        assert len({port for _, port in found}) == 1  # one socket for the bundled connection
        assert all(21600 <= port <= 21609 for _, port in found)
    finally:
        await pc.close()
        await engine.close()


async def test_an_exhausted_port_range_refuses_with_503(loopback: None) -> None:
    engine = Sfu(sfu_settings(rtc_udp_ports="21610-21610"))
    peers = [Peer("doctor"), Peer("patient")]
    try:
        await peers[0].join(engine, "room-ports")
        with pytest.raises(PortsExhausted) as refused:
            await peers[1].join(engine, "room-ports")
        assert refused.value.status_code == 503
        assert refused.value.extra["reason"] == "rtc_ports_exhausted"
        assert set(engine.rooms["room-ports"].participants) == {"doctor"}
    finally:
        await closing(*peers)
        await engine.close()


def _udp_sockets() -> dict[str, int]:
    """inode → local port of every UDP socket on the host (this process's are among them)."""
    found = {}
    for table in ("/proc/self/net/udp", "/proc/self/net/udp6"):
        with open(table) as lines:
            next(lines)
            for line in lines:
                fields = line.split()
                found[fields[9]] = int(fields[1].rsplit(":", 1)[1], 16)
    return found


def resources() -> dict[str, int]:
    gc.collect()
    links = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            links.append(os.readlink(Path("/proc/self/fd") / fd))
        except OSError:  # closed meanwhile (the listing's own descriptor)
            continue
    udp = _udp_sockets()
    ours = [udp[link[8:-1]] for link in links if link.startswith("socket:[") and link[8:-1] in udp]
    return {"tasks": len(asyncio.all_tasks()), "fds": len(links), "threads": threading.active_count(),
            "udp": len(ours), "sfu_ports": sum(1 for port in ours if PORTS[0] <= port <= PORTS[1])}


async def test_fifty_calls_set_up_and_closed_leave_no_tasks_sockets_or_ports(sfu: Sfu) -> None:
    async def one(i: int) -> None:
        doctor, patient = await call(sfu, f"room-leak-{i}")
        assert resources()["sfu_ports"] == 2
        # the SFU closes first: what it frees is its own doing (a client closing would also make aiortc close
        # the SFU's side when its DTLS ends)
        await sfu.close_room(f"room-leak-{i}")
        assert resources()["sfu_ports"] == 0
        await closing(doctor, patient)

    for i in range(2):  # first calls warm up what stays for the process (codec libraries, executor threads)
        await one(i)
    before = resources()
    for i in range(2, 52):
        await one(i)
    await sfu.close_room("room-leak-51")  # idempotent
    after = resources()
    assert sfu.load().rooms == 0
    assert sfu.load().participants == 0
    assert after["udp"] <= before["udp"], (before, after)
    assert after["fds"] <= before["fds"] + 2, (before, after)
    assert after["tasks"] <= before["tasks"] + 2, (before, after)
    assert after["threads"] <= before["threads"] + 2, (before, after)


async def test_load_counts_rooms_participants_and_forwarded_streams(sfu: Sfu) -> None:
    assert sfu.load().rooms == 0
    doctor = Peer("doctor")
    try:
        await doctor.join(sfu, "room-load")
        load = sfu.load()
        assert (load.rooms, load.participants, load.streams) == (1, 1, 0)  # nobody to forward to yet
    finally:
        await doctor.close()
    await sfu.close()
    assert sfu.load().rooms == 0


async def test_connections_share_one_certificate(sfu: Sfu) -> None:
    # aiortc makes a key pair per connection; the SFU sets its own one (a private attribute) before any transport
    fingerprints = []
    for room in ("room-cert-1", "room-cert-2"):
        pc = RTCPeerConnection()
        pc.addTransceiver("audio", direction="sendrecv")
        pc.addTransceiver("video", direction="sendrecv")
        try:
            await pc.setLocalDescription(await pc.createOffer())
            answer, _ = await sfu.offer(room, "doctor", pc.localDescription.sdp)
            fingerprints.append(set(re.findall(r"a=fingerprint:sha-256 (\S+)", answer)))
        finally:
            await pc.close()
    assert len(fingerprints[0]) == 1
    assert fingerprints[0] == fingerprints[1]
    assert sfu._certificate is not None
    assert sfu._certificate.getFingerprints()[0].value in fingerprints[0]


async def test_candidates_trickled_after_the_offer_connect_the_call(sfu: Sfu) -> None:
    doctor = Peer("doctor")
    patient = Peer("patient")
    try:
        await doctor.join(sfu, "room-trickle")
        # the patient's offer goes out before its candidates (as a browser's does); they follow one by one
        patient._setup()
        await patient.pc.setLocalDescription(await patient.pc.createOffer())
        full = patient.pc.localDescription.sdp
        lines = re.findall(r"^a=(candidate:.*?)\r?$", full, flags=re.MULTILINE)
        assert lines
        bare = re.sub(r"^a=(candidate:.*|end-of-candidates)\r?\n", "", full, flags=re.MULTILINE)
        answer, type_ = await sfu.offer("room-trickle", "patient", bare)
        await patient.pc.setRemoteDescription(RTCSessionDescription(sdp=answer, type=type_))
        for line in lines:
            await sfu.candidate("room-trickle", "patient", f"a={line}")
        await sfu.candidate("room-trickle", "patient", None)
        await sfu.candidate("room-trickle", "nobody", None)  # gone or never here: nothing happens
        await patient.frames_reach("video", 5)
        await doctor.frames_reach("video", 5)
    finally:
        await closing(doctor, patient)


async def test_an_offer_that_cannot_be_answered_is_refused_and_leaves_no_room(sfu: Sfu) -> None:
    with pytest.raises(Invalid) as refused:
        await sfu.offer("room-bad", "doctor", "v=0\r\nnot sdp at all\r\n")
    assert refused.value.extra["reason"] == "invalid_offer"
    with pytest.raises(Invalid) as refused:
        await sfu.offer("room-bad", "doctor", "v=0\r\n", "answer")
    assert refused.value.extra["reason"] == "not_an_offer"
    pc = RTCPeerConnection()
    pc.createDataChannel("chat")  # neither audio nor video
    try:
        await pc.setLocalDescription(await pc.createOffer())
        with pytest.raises(Invalid):
            await sfu.offer("room-bad", "doctor", pc.localDescription.sdp)
    finally:
        await pc.close()
    assert "room-bad" not in sfu.rooms


async def test_a_participant_that_hangs_up_leaves_the_room_and_frees_its_port(sfu: Sfu) -> None:
    doctor, patient = await call(sfu, "room-hangup")
    try:
        theirs = sfu.rooms["room-hangup"].participants["patient"].pc
        closed = asyncio.Event()
        theirs.on("connectionstatechange", lambda: theirs.connectionState == "closed" and closed.set())
        assert resources()["sfu_ports"] == 2
        await patient.close()  # its DTLS close reaches the SFU, whose aiortc connection then closes itself
        await asyncio.wait_for(closed.wait(), 20)
        await asyncio.gather(*sfu._tasks)
        assert set(sfu.rooms["room-hangup"].participants) == {"doctor"}
        assert resources()["sfu_ports"] == 1
        assert sfu.load().streams == 0
    finally:
        await closing(doctor, patient)


async def test_an_offer_once_the_call_ended_is_refused_and_does_not_recreate_the_room(sfu: Sfu) -> None:
    doctor, patient = await call(sfu, "room-ended")
    alone, late, racing, never = Peer("doctor"), Peer("doctor"), Peer("patient"), Peer("doctor")
    try:
        egress = sfu.rooms["room-ended"].participants["patient"].egress["video"]
        await sfu.close_room("room-ended")
        assert egress.history is None  # its retransmission buffer is freed with it
        with pytest.raises(CallEnded) as refused:
            await late.join(sfu, "room-ended")  # a reconnect's offer that reached the node after the end
        assert refused.value.status_code == 409
        assert refused.value.extra["reason"] == "call_ended"
        # an offer racing the close: the close has begun (its connection is closing) when the offer arrives
        await alone.join(sfu, "room-ended-2")
        closing_task = asyncio.ensure_future(sfu.close_room("room-ended-2"))
        outcome = await asyncio.gather(racing.join(sfu, "room-ended-2"), closing_task, return_exceptions=True)
        assert isinstance(outcome[0], CallEnded), outcome
        # a room the node never held (the call ended before any offer reached it) is ended as well
        await sfu.close_room("room-ended-3")
        with pytest.raises(CallEnded):
            await never.join(sfu, "room-ended-3")
        assert not {"room-ended", "room-ended-2", "room-ended-3"} & set(sfu.rooms)
        assert sfu.load().participants == 0
    finally:
        await closing(doctor, patient, alone, late, racing, never)


async def test_the_memory_of_ended_rooms_is_capped() -> None:
    engine = Sfu(sfu_settings())
    pc = RTCPeerConnection()
    pc.addTransceiver("audio", direction="sendrecv")
    try:
        await pc.setLocalDescription(await pc.createOffer())
        for i in range(ENDED_ROOMS_MAX + 50):
            await engine.close_room(f"room-capped-{i}")
        assert len(engine._ended) == ENDED_ROOMS_MAX
        assert "room-capped-0" not in engine._ended  # the oldest go first
        with pytest.raises(CallEnded):
            await engine.offer(f"room-capped-{ENDED_ROOMS_MAX + 49}", "doctor", pc.localDescription.sdp)
    finally:
        await pc.close()
        await engine.close()


async def test_a_subscriber_socket_that_takes_no_more_drops_media_instead_of_queueing_it(sfu: Sfu) -> None:
    doctor, patient = await call(sfu, "room-backlog")
    try:
        room = sfu.rooms["room-backlog"]
        leg = room.participants["patient"].leg
        assert leg is not None
        protocol = leg.dtls.transport._connection._nominated[1].protocol  # hook: aioice's nominated pair
        egress, ingress = room.participants["patient"].egress["video"], room.participants["doctor"].ingress["video"]
        protocol.pause_writing()  # what asyncio calls once the socket refused enough to pass its high-water mark
        sent, received = egress.packets, ingress.received
        await doctor.until(lambda: ingress.received >= received + 10, "10 more video packets at the SFU")
        assert egress.packets == sent  # dropped, not handed to asyncio's unbounded buffer
        assert protocol.transport.get_write_buffer_size() == 0
        protocol.resume_writing()
        await patient.more_frames("video", 5)
        assert egress.packets > sent
    finally:
        await closing(doctor, patient)


async def test_a_publisher_that_keeps_changing_ssrc_does_not_grow_the_routing_table(sfu: Sfu) -> None:
    doctor, patient = await call(sfu, "room-ssrcs")
    try:
        ingress = sfu.rooms["room-ssrcs"].participants["doctor"].ingress["video"]
        table = ingress.leg.dtls._rtp_router.ssrc_table  # hook: aiortc's RtpRouter
        size = len(table)
        pt = next(iter(ingress.codecs))
        for ssrc in range(1000, 1200):  # plain packets as the fast path hands them on, each from a new SSRC
            ingress.receive(bytes([0x80, pt]) + struct.pack("!HII", 1, 0, ssrc) + b"\x00" * 20)
        assert len(table) <= size + 1
        assert table[1199] is ingress  # the current one still routes its sender reports here
    finally:
        await closing(doctor, patient)
