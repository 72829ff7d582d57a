"""Real call clients for end-to-end tests: Debian's headless Chromium driven by Playwright (never Playwright's own
browser download), and aiortc peers with a moving test picture that count the frames they receive."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from aiortc import MediaStreamTrack, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import AudioStreamTrack, MediaStreamError, VideoStreamTrack
from av import VideoFrame
from playwright.async_api import Browser, async_playwright

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
    "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
    # a fake camera and microphone, granted without a prompt
    "--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream",
    # without it Chromium gathers no candidate on a loopback-only host and never connects
    "--allow-loopback-in-peer-connection",
    "--autoplay-policy=no-user-gesture-required",
]


@asynccontextmanager
async def chromium() -> AsyncIterator[Browser]:
    """Headless Chromium (its profile a fresh temporary one); each test opens a context of its own in it."""
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            await browser.close()


class MovingPicture(VideoStreamTrack):
    """A small picture whose brightness changes every frame, so every frame is new to the encoder."""

    def __init__(self, width: int = 320, height: int = 240) -> None:
        super().__init__()
        self.width, self.height, self.count = width, height, 0

    async def recv(self) -> VideoFrame:
        pts, time_base = await self.next_timestamp()
        frame = VideoFrame(width=self.width, height=self.height)
        self.count += 1
        for plane in frame.planes:
            plane.update(bytes([(self.count * 4) % 256]) * plane.buffer_size)
        frame.pts, frame.time_base = pts, time_base
        return frame


class FrameCounter:
    """Reads a received track to its end, counting its frames; `reached(n)` waits until n have arrived."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {"audio": 0, "video": 0}
        self._changed = asyncio.Condition()
        self._tasks: set[asyncio.Task[None]] = set()

    def read(self, track: MediaStreamTrack) -> None:
        task = asyncio.create_task(self._read(track))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _read(self, track: MediaStreamTrack) -> None:
        with contextlib.suppress(MediaStreamError):
            while True:
                await track.recv()
                async with self._changed:
                    self.counts[track.kind] += 1
                    self._changed.notify_all()

    async def reached(self, kind: str, frames: int) -> int:
        async with self._changed:
            await self._changed.wait_for(lambda: self.counts[kind] >= frames)
            return self.counts[kind]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


class Peer:
    """An aiortc call participant sending a test picture and a tone-less audio track on one audio and one
    video transceiver (sendrecv), counting what it receives on them."""

    def __init__(self) -> None:
        self.pc = RTCPeerConnection()
        self.received = FrameCounter()
        self.video = MovingPicture()
        self.audio = AudioStreamTrack()
        self.pc.on("track", self.received.read)

    def connected(self) -> asyncio.Future[None]:
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        @self.pc.on("connectionstatechange")
        def changed() -> None:
            if self.pc.connectionState == "connected" and not done.done():
                done.set_result(None)
            elif self.pc.connectionState == "failed" and not done.done():
                done.set_exception(AssertionError("the peer connection failed"))

        return done

    async def offer(self) -> RTCSessionDescription:
        """Our offer, candidates gathered (aiortc gathers before setLocalDescription returns)."""
        self.pc.addTransceiver(self.audio, direction="sendrecv")
        self.pc.addTransceiver(self.video, direction="sendrecv")
        await self.pc.setLocalDescription(await self.pc.createOffer())
        return self.pc.localDescription

    async def answer(self, offer: RTCSessionDescription) -> RTCSessionDescription:
        """Answer another's offer, sending our media on the transceivers it offered."""
        await self.pc.setRemoteDescription(offer)
        self.pc.addTrack(self.audio)  # on the offered transceivers, which become sendrecv
        self.pc.addTrack(self.video)
        await self.pc.setLocalDescription(await self.pc.createAnswer())
        return self.pc.localDescription

    async def close(self) -> None:
        await self.received.stop()
        await self.pc.close()

