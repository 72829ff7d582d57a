"""Plain aiortc clients for the SFU tests: a doctor or patient with one audio and one video track, which offers
to an `Sfu`, decodes what it receives (clients may decode; the SFU may not) and counts the frames."""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Callable
from typing import Any

from aiortc import RTCPeerConnection, RTCRtpSender, RTCSessionDescription, VideoStreamTrack
from aiortc.mediastreams import AudioStreamTrack, MediaStreamError
from av import VideoFrame

from app.rtc.sfu.engine import Sfu

WAIT = 20.0  # a bound on waits for media, so a broken path fails instead of hanging (never reached when it works)


class SmallVideo(VideoStreamTrack):
    """160x120 frames: the clients' encoders and decoders stay cheap on a two-core machine. aiortc's VP8 encoder
    makes a keyframe only at the start and when asked (its kf_max_dist is 3000 frames), which is what the
    keyframe path is tested against."""

    def __init__(self, width: int = 160, height: int = 120, on_frame: Callable[[], None] | None = None) -> None:
        super().__init__()
        self.size = (width, height)
        self.count = 0
        self.on_frame = on_frame

    async def recv(self) -> VideoFrame:
        pts, time_base = await self.next_timestamp()
        frame = VideoFrame(width=self.size[0], height=self.size[1])
        for plane in frame.planes:  # a changing picture, so deltas carry something
            plane.update(bytes([self.count % 256]) * plane.buffer_size)
        self.count += 1
        if self.on_frame is not None:
            self.on_frame()
        frame.pts, frame.time_base = pts, time_base
        return frame


class Peer:
    def __init__(self, name: str, video_codec: str | None = None) -> None:
        self.name = name
        self.video_codec = video_codec  # "video/H264": offer only that
        self.pc = RTCPeerConnection()
        self.frames: collections.Counter[str] = collections.Counter()
        self.first_frame_at: dict[str, float] = {}
        self._waiters: list[tuple[Callable[[], bool], asyncio.Future[None]]] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self.audio = AudioStreamTrack()
        self.video = SmallVideo(on_frame=self._wake)
        self.keyframe_requests = 0  # PLIs/FIRs that reached our video sender
        self.retransmit_requests: list[int] = []  # sequence numbers NACKed to our video sender
        self.sender_rtcp: list[Any] = []  # RTCP packets routed to our video sender
        self.receiver_rtcp: list[Any] = []  # and to our video receiver
        # the video RTP packets the SFU sent us, as our receiver got them: (ssrc, payload type, seq, ts, payload)
        self.video_rtp: list[tuple[int, int, int, int, bytes]] = []
        self.drop_video: Callable[[Any], bool] = lambda packet: False  # simulated loss on the way in

    def _setup(self) -> None:
        self.pc.addTrack(self.audio)
        video_sender = self.pc.addTrack(self.video)
        if self.video_codec is not None:
            transceiver = next(t for t in self.pc.getTransceivers() if t.sender is video_sender)
            caps = RTCRtpSender.getCapabilities("video").codecs
            transceiver.setCodecPreferences([c for c in caps if c.mimeType.lower() in
                                             (self.video_codec.lower(), "video/rtx")])
        peer = self
        original_keyframe = video_sender._send_keyframe
        original_retransmit = video_sender._retransmit

        def send_keyframe() -> None:
            peer.keyframe_requests += 1
            original_keyframe()

        async def retransmit(sequence_number: int) -> None:
            peer.retransmit_requests.append(sequence_number)
            await original_retransmit(sequence_number)

        video_sender._send_keyframe = send_keyframe  # type: ignore[method-assign]
        video_sender._retransmit = retransmit  # type: ignore[method-assign]
        original_sender_rtcp = video_sender._handle_rtcp_packet

        async def sender_rtcp(packet: Any) -> None:
            peer.sender_rtcp.append(packet)
            peer._wake()
            await original_sender_rtcp(packet)

        video_sender._handle_rtcp_packet = sender_rtcp  # type: ignore[method-assign]
        video_receiver = next(t.receiver for t in self.pc.getTransceivers() if t.sender is video_sender)
        original_rtp, original_receiver_rtcp = video_receiver._handle_rtp_packet, video_receiver._handle_rtcp_packet

        async def receiver_rtp(packet: Any, arrival_time_ms: int) -> None:
            if peer.drop_video(packet):
                return
            peer.video_rtp.append((packet.ssrc, packet.payload_type, packet.sequence_number, packet.timestamp,
                                   packet.payload[:32]))
            peer._wake()
            await original_rtp(packet, arrival_time_ms)

        async def receiver_rtcp(packet: Any) -> None:
            peer.receiver_rtcp.append(packet)
            peer._wake()
            await original_receiver_rtcp(packet)

        video_receiver._handle_rtp_packet = receiver_rtp  # type: ignore[method-assign]
        video_receiver._handle_rtcp_packet = receiver_rtcp  # type: ignore[method-assign]

        @self.pc.on("track")
        def on_track(track: Any) -> None:
            task = asyncio.ensure_future(self._count(track))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _count(self, track: Any) -> None:
        while True:
            try:
                await track.recv()
            except MediaStreamError:
                return
            self.frames[track.kind] += 1
            self.first_frame_at.setdefault(track.kind, time.monotonic())
            self._wake()

    def _wake(self) -> None:
        for check, future in list(self._waiters):
            if not future.done() and check():
                future.set_result(None)

    async def until(self, check: Callable[[], bool], what: str) -> None:
        if check():
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (check, future)
        self._waiters.append(entry)
        try:
            await asyncio.wait_for(future, WAIT)
        except TimeoutError:
            frames = dict(self.frames)
            raise AssertionError(f"{self.name}: {what} did not happen within {WAIT}s; frames {frames}") from None
        finally:
            self._waiters.remove(entry)

    async def frames_reach(self, kind: str, count: int) -> None:
        await self.until(lambda: self.frames[kind] >= count, f"{count} {kind} frames")

    async def more_frames(self, kind: str, more: int) -> None:
        await self.frames_reach(kind, self.frames[kind] + more)

    async def join(self, sfu: Sfu, room: str, participant: str | None = None) -> float:
        """Offer through the SFU; returns when the answer is applied (the monotonic time it was)."""
        self._setup()
        await self.pc.setLocalDescription(await self.pc.createOffer())
        sdp, type_ = await sfu.offer(room, participant or self.name, self.pc.localDescription.sdp)
        await self.pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type=type_))
        return time.monotonic()

    async def close(self) -> None:
        await self.pc.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self.audio.stop()
        self.video.stop()


async def call(sfu: Sfu, room: str, *, video_codec: str | None = None) -> tuple[Peer, Peer]:
    """A doctor and a patient in one room, each receiving the other's audio and video."""
    doctor, patient = Peer("doctor", video_codec), Peer("patient", video_codec)
    await doctor.join(sfu, room)
    await patient.join(sfu, room)
    for peer in (doctor, patient):
        await peer.frames_reach("video", 1)
        await peer.frames_reach("audio", 1)
    return doctor, patient

