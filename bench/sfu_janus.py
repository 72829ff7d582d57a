"""Janus VideoRoom for the SFU benchmark, driven over Janus's HTTP API by the same generator.

Janus (the Debian package `janus`) is started pinned like the other servers, from a config written to a
temporary folder that loads only the VideoRoom plugin and the HTTP transport. Its ICE does not use loopback, so
it gathers on one non-loopback IPv4 address of this host, and the generator's connections to Janus do too: the
first such address found, else (as root, or always with `--janus-veth`) a veth pair `sfubench0`/`sfubench1` with
10.77.0.1/32, made and removed here (this host's kernel has no dummy interfaces).

A call: one room (`create`), and per participant a publisher handle (`joinandconfigure` with the generator's
sendonly offer; Janus answers) and, once the other side has published, a subscriber handle (`join` as
subscriber to the other's feed; Janus offers, the generator answers, `start`). One Janus session holds every
handle; one long-poll loop takes its events and hands each to the request waiting for it.

Janus runs with one static event loop (`event_loops = 1`): one thread for every handle, as fits one core. With
its default (a loop thread per handle) it fell to 8-10 fps at N=10 on this shared machine while using 15 % of
its core: each packet crosses threads from the publisher's loop to the subscriber's, and every hand-off waited
on a busy scheduler.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import random
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from bench.common import free_port
from bench.sfu import Leg, connected, media_offer_pc, pinned, renice_autogroup, start_publishing, tail
from bench.sfu_gen import (
    Clip,
    FastPath,
    Inbound,
    hook_receive,
    new_peer_connection,
    sdp_payload_types,
    use_host_addresses,
)

PLUGINS = Path("/usr/lib/x86_64-linux-gnu/janus")
VETH = ("sfubench0", "sfubench1")
VETH_ADDRESS = "10.77.0.1"


def non_loopback_ipv4() -> str | None:
    import ifaddr

    for adapter in ifaddr.get_adapters():
        for ip in adapter.ips:
            if isinstance(ip.ip, str) and not ip.ip.startswith("127.") and not ip.ip.startswith("169.254."):
                return ip.ip
    return None


def unavailable() -> str | None:
    """None when Janus can be measured here, else why not."""
    if shutil.which("janus") is None:
        return "the janus package is not installed (apt-get install -y janus)"
    if not (PLUGINS / "plugins" / "libjanus_videoroom.so").exists():
        return f"no VideoRoom plugin under {PLUGINS}"
    if non_loopback_ipv4() is None and (os.geteuid() != 0 or shutil.which("ip") is None):
        return "no non-loopback IPv4 address, and not root to add a veth pair"
    return None


def _config(folder: Path, address: str, http_port: int, rtp_low: int) -> None:
    for kind, keep in (("plugins", "libjanus_videoroom.so"), ("transports", "libjanus_http.so")):
        (folder / kind).mkdir()
        (folder / kind / keep).symlink_to(PLUGINS / kind / keep)
    (folder / "none").mkdir()
    (folder / "janus.jcfg").write_text(f"""general: {{
  configs_folder = "{folder}"
  plugins_folder = "{folder}/plugins"
  transports_folder = "{folder}/transports"
  events_folder = "{folder}/none"
  loggers_folder = "{folder}/none"
  debug_level = 3
  session_timeout = 120
  event_loops = 1
}}
media: {{
  rtp_port_range = "{rtp_low}-{rtp_low + 1999}"
}}
nat: {{
  nice_debug = false
  full_trickle = false
  ice_enforce_list = "{address}"
  ignore_mdns = true
}}
""")
    (folder / "janus.plugin.videoroom.jcfg").write_text("general: {\n}\n")
    (folder / "janus.transport.http.jcfg").write_text(f"""general: {{
  json = "compact"
  base_path = "/janus"
  http = true
  port = {http_port}
  ip = "127.0.0.1"
  https = false
}}
admin: {{
  admin_http = false
}}
""")


class JanusDriver:
    name = "janus"

    def __init__(self, audio: bool, log_dir: Path, veth: bool = False) -> None:
        self.audio = audio
        self.veth = veth
        self.log = log_dir / "janus.log"
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.pid = 0
        self.http: httpx.AsyncClient | None = None
        self.session = 0
        self.folder: tempfile.TemporaryDirectory[str] | None = None
        self.address = ""
        self.made_veth = False
        self.waiting: dict[int, asyncio.Queue[dict[str, Any]]] = {}  # handle → its events
        self.poller: asyncio.Task[None] | None = None
        self.rooms: dict[str, int] = {}
        self.handles: dict[str, list[int]] = {}  # a call's handles, detached when it ends
        self.room_ids = itertools.count(random.randrange(1_000, 1_000_000))

    def _address(self) -> str:
        found = None if self.veth else non_loopback_ipv4()
        if found:
            return found
        subprocess.run(["ip", "link", "add", VETH[0], "type", "veth", "peer", "name", VETH[1]], check=True)
        self.made_veth = True
        subprocess.run(["ip", "addr", "add", f"{VETH_ADDRESS}/32", "dev", VETH[0]], check=True)
        for name in VETH:
            subprocess.run(["ip", "link", "set", name, "up"], check=True)
        return VETH_ADDRESS

    async def start(self) -> None:
        self.address = self._address()
        use_host_addresses([self.address])  # the generator's connections to Janus gather there too
        self.folder = tempfile.TemporaryDirectory(prefix="bench-janus-")
        folder = Path(self.folder.name)
        _config(folder, self.address, self.port, 30_000 + random.randrange(0, 10) * 2000)
        cmd = pinned(["janus", "-C", str(folder / "janus.jcfg"), "-F", str(folder), "--disable-colors"])
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        self.pid = self.proc.pid
        renice_autogroup(self.pid)
        self.http = httpx.AsyncClient(base_url=f"http://127.0.0.1:{self.port}/janus", timeout=30.0,
                                      limits=httpx.Limits(max_connections=64, max_keepalive_connections=64))
        deadline = time.monotonic() + 30
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"janus exited with {self.proc.returncode}: {tail(self.log)}")
            with contextlib.suppress(httpx.HTTPError):
                if (await self.http.get("/info")).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"janus gave no /info within 30 s: {tail(self.log)}")
            await asyncio.sleep(0.1)
        created = await self._post("", {"janus": "create"})
        self.session = int(created["data"]["id"])
        self.poller = asyncio.create_task(self._poll())

    async def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        assert self.http is not None
        body = {"transaction": secrets.token_hex(6), **body}
        answer = (await self.http.post(path, json=body)).json()
        if answer.get("janus") == "error":
            raise ConnectionError(f"janus: {answer.get('error')}")
        return dict(answer)

    async def _poll(self) -> None:
        assert self.http is not None
        while True:
            try:
                events = (await self.http.get(f"/{self.session}", params={"maxev": 50}, timeout=40.0)).json()
            except (httpx.HTTPError, ValueError):
                await asyncio.sleep(0.2)
                continue
            for event in events if isinstance(events, list) else [events]:
                queue = self.waiting.get(int(event.get("sender", 0)))
                if queue is not None:
                    queue.put_nowait(event)

    async def _attach(self, room: str) -> int:
        attached = await self._post(f"/{self.session}", {"janus": "attach", "plugin": "janus.plugin.videoroom"})
        handle = int(attached["data"]["id"])
        self.waiting[handle] = asyncio.Queue()
        self.handles.setdefault(room, []).append(handle)
        return handle

    async def _detach(self, room: str) -> None:
        for handle in self.handles.pop(room, []):
            self.waiting.pop(handle, None)
            with contextlib.suppress(ConnectionError, httpx.HTTPError):
                await self._post(f"/{self.session}/{handle}", {"janus": "detach"})

    async def _message(self, handle: int, body: dict[str, Any], jsep: dict[str, Any] | None = None,
                       timeout: float = 10.0) -> dict[str, Any]:
        """A plugin request; its answer (synchronous) or the event that answers it (asynchronous)."""
        request: dict[str, Any] = {"janus": "message", "body": body}
        if jsep is not None:
            request["jsep"] = jsep
        answer = await self._post(f"/{self.session}/{handle}", request)
        if answer.get("janus") == "success":
            data = answer["plugindata"]["data"]
            if "error" in data:
                raise ConnectionError(f"videoroom: {data['error']}")
            return dict(answer)
        async with asyncio.timeout(timeout):
            while True:
                event = await self.waiting[handle].get()
                if event.get("janus") == "event":
                    data = event["plugindata"]["data"]
                    if "error" in data:
                        raise ConnectionError(f"videoroom: {data['error']}")
                    return dict(event)

    async def _publish(self, call: str, room: int, name: str, leg: Leg, clip: Clip, rng: random.Random) -> int:
        handle = await self._attach(call)
        pc = media_offer_pc(["audio", "video"] if self.audio else ["video"])
        for transceiver in pc.getTransceivers():
            transceiver.direction = "sendonly"
        leg.pcs.append(pc)
        await pc.setLocalDescription(await pc.createOffer())
        event = await self._message(handle, {"request": "joinandconfigure", "room": room, "ptype": "publisher",
                                             "display": name, "audio": self.audio, "video": True},
                                    {"type": "offer", "sdp": pc.localDescription.sdp, "trickle": False})
        from aiortc import RTCSessionDescription

        answer = event["jsep"]["sdp"]
        leg.mark("answer")
        await pc.setRemoteDescription(RTCSessionDescription(sdp=answer, type="answer"))
        feedback = Inbound()
        hook_receive(pc.getTransceivers()[0].sender.transport, feedback)
        await connected(pc)
        leg.mark("connected")
        start_publishing(leg, pc, clip, answer, rng, self.audio, inbound=feedback)
        return int(event["plugindata"]["data"]["id"])

    async def _subscribe(self, call: str, room: int, feed: int, leg: Leg) -> None:
        handle = await self._attach(call)
        event = await self._message(handle, {"request": "join", "room": room, "ptype": "subscriber",
                                             "streams": [{"feed": feed}]})
        from aiortc import RTCSessionDescription

        pc = new_peer_connection()
        leg.pcs.append(pc)
        offer = event["jsep"]["sdp"]
        leg.mark("sub_offer")
        await pc.setRemoteDescription(RTCSessionDescription(sdp=offer, type="offer"))
        await pc.setLocalDescription(await pc.createAnswer())
        types = sdp_payload_types(offer)
        leg.inbound.video_pt, leg.inbound.rtx_pt, leg.inbound.audio_pt = (
            types.get("vp8"), types.get("rtx"), types.get("opus"))
        hook_receive(pc.getTransceivers()[0].receiver.transport, leg.inbound)
        await self._message(handle, {"request": "start", "room": room},
                            {"type": "answer", "sdp": pc.localDescription.sdp, "trickle": False})
        await connected(pc)
        leg.mark("sub_connected")
        FastPath(pc.getTransceivers()[0].receiver.transport, leg.inbound)

    async def call(self, room: str, clip: Clip, rng: random.Random) -> list[Leg]:
        legs = [Leg(started=time.monotonic()), Leg(started=time.monotonic())]
        try:
            handle = await self._attach(room)
            room_id = next(self.room_ids)
            await self._message(handle, {"request": "create", "room": room_id, "publishers": 2,
                                         "videocodec": "vp8", "audiocodec": "opus", "bitrate": 0,
                                         "fir_freq": 0, "notify_joining": False})
            self.rooms[room] = room_id
            for leg in legs:
                leg.started = time.monotonic()
            feeds = await asyncio.gather(*(self._publish(room, room_id, n, leg, clip, rng)
                                           for n, leg in zip(("a", "b"), legs, strict=True)))
            await asyncio.gather(self._subscribe(room, room_id, feeds[1], legs[0]),
                                 self._subscribe(room, room_id, feeds[0], legs[1]))
        except (ConnectionError, TimeoutError, httpx.HTTPError, ValueError, KeyError) as exc:
            for leg in legs:
                leg.failed = leg.failed or f"{type(exc).__name__}: {exc}"
        return legs

    async def health(self) -> dict[str, Any]:
        return {}  # the VideoRoom's own counts would need the admin API

    async def end(self, room: str, legs: list[Leg]) -> None:
        await asyncio.gather(*(leg.close() for leg in legs))
        room_id = self.rooms.pop(room, None)
        if room_id is not None and room in self.handles:
            with contextlib.suppress(ConnectionError, httpx.HTTPError, TimeoutError):
                await self._message(self.handles[room][0], {"request": "destroy", "room": room_id})
        await self._detach(room)

    async def stop(self) -> None:
        if self.poller is not None:
            self.poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.poller
        if self.http is not None:
            await self.http.aclose()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(asyncio.to_thread(self.proc.wait), 15)
            except TimeoutError:
                self.proc.kill()
                await asyncio.to_thread(self.proc.wait)
        if self.folder is not None:
            self.folder.cleanup()
        if self.made_veth:
            subprocess.run(["ip", "link", "del", VETH[0]], check=False)  # its peer goes with it
