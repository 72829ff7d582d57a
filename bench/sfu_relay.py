"""The SFU benchmark's baseline server: aiortc's `MediaRelay`, decoding each side's media and re-encoding it for
the other, behind the same control interface as an SFU node, so that the same generator drives both.

    SFU_SECRET=s SFU_LISTEN=127.0.0.1:8101 RTC_HOST_ADDRESSES=127.0.0.1 python -m bench.sfu_relay

- `POST /rooms/{room}/participants/{participant}/offer` `{"sdp", "type"}` → `{"sdp", "type": "answer"}`
- `DELETE /rooms/{room}` → 204; `GET /health` → `{"node", "rooms", "participants", "streams"}`
- `Authorization: Bearer <SFU_SECRET>` on each.

Each participant's answer carries an audio and a video track from the start (no renegotiation); they play the
other participant's tracks through `MediaRelay` once that one has published (aiortc's encoder then encodes
every decoded frame again). RTC_UDP_PORTS is not honoured here (aioice picks ports).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import os
import signal
from dataclasses import dataclass, field
from typing import Any

from bench.sfu_gen import use_host_addresses

MAX_BODY = 256 * 1024


class RelayedTrack:
    """A sending track that waits until the other side's track exists, then plays its relayed copy."""

    def __new__(cls, kind: str) -> Any:
        from aiortc.mediastreams import MediaStreamTrack

        class _Relayed(MediaStreamTrack):
            def __init__(self) -> None:
                super().__init__()
                self.kind = kind
                self.source: Any = None
                self.ready = asyncio.Event()

            def attach(self, source: Any) -> None:
                self.source = source
                self.ready.set()

            async def recv(self) -> Any:
                if self.source is None:
                    await self.ready.wait()
                return await self.source.recv()

        return _Relayed()


@dataclass
class Participant:
    pc: Any
    outgoing: dict[str, Any]  # kind → RelayedTrack sent to this participant
    incoming: dict[str, Any] = field(default_factory=dict)  # kind → the track this participant publishes


class Relay:
    def __init__(self) -> None:
        from aiortc.contrib.media import MediaRelay

        self.media = MediaRelay()
        self.rooms: dict[str, dict[str, Participant]] = {}

    async def offer(self, room_id: str, participant_id: str, sdp: str, type_: str) -> tuple[str, str]:
        from aiortc import RTCPeerConnection, RTCSessionDescription

        room = self.rooms.setdefault(room_id, {})
        old = room.pop(participant_id, None)
        if old is not None:
            await old.pc.close()
        if len(room) >= 2:
            raise PermissionError("room_full")
        pc = RTCPeerConnection()
        me = Participant(pc=pc, outgoing={})
        room[participant_id] = me

        def on_track(track: Any) -> None:
            me.incoming[track.kind] = track
            for other_id, other in room.items():
                if other_id != participant_id and track.kind in other.outgoing:
                    other.outgoing[track.kind].attach(self.media.subscribe(track))

        pc.on("track", on_track)
        await pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type=type_))
        for transceiver in pc.getTransceivers():
            track = RelayedTrack(transceiver.kind)
            me.outgoing[transceiver.kind] = track
            transceiver.sender.replaceTrack(track)
            transceiver.direction = "sendrecv"
        for other_id, other in room.items():  # the other side published already
            if other_id != participant_id:
                for kind, source in other.incoming.items():
                    if kind in me.outgoing:
                        me.outgoing[kind].attach(self.media.subscribe(source))
        answer = await pc.createAnswer()
        await pc.setLocalDescription(answer)
        return pc.localDescription.sdp, pc.localDescription.type

    async def close_room(self, room_id: str) -> None:
        room = self.rooms.pop(room_id, {})
        await asyncio.gather(*(p.pc.close() for p in room.values()), return_exceptions=True)

    def load(self) -> dict[str, int]:
        participants = sum(len(r) for r in self.rooms.values())
        streams = sum(1 for r in self.rooms.values() for p in r.values() for t in p.outgoing.values()
                      if t.source is not None)
        return {"rooms": len(self.rooms), "participants": participants, "streams": streams}


async def _respond(writer: asyncio.StreamWriter, status: int, body: Any = None) -> None:
    data = b"" if body is None else json.dumps(body).encode()
    reason = {200: "OK", 204: "No Content", 400: "Bad Request", 401: "Unauthorized", 404: "Not Found",
              409: "Conflict"}.get(status, "Error")
    head = f"HTTP/1.1 {status} {reason}\r\nContent-Length: {len(data)}\r\nContent-Type: application/json\r\n\r\n"
    writer.write(head.encode() + data)
    await writer.drain()


async def serve(relay: Relay, secret: str, host: str, port: int) -> asyncio.Server:
    expected = f"Bearer {secret}".encode()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                line = await reader.readline()
                if not line:
                    return
                method, path, _ = line.decode().split(" ", 2)
                headers: dict[str, bytes] = {}
                while (h := await reader.readline()) not in (b"\r\n", b"\n", b""):
                    name, _, value = h.partition(b":")
                    headers[name.strip().lower().decode()] = value.strip()
                length = int(headers.get("content-length", b"0"))
                if length > MAX_BODY:
                    await _respond(writer, 400, {"reason": "too_large", "detail": "body too large"})
                    return
                body = await reader.readexactly(length) if length else b""
                if not hmac.compare_digest(headers.get("authorization", b""), expected):
                    await _respond(writer, 401, {"reason": "not_authenticated", "detail": "bad secret"})
                    continue
                parts = path.strip("/").split("/")
                try:
                    if method == "GET" and parts == ["health"]:
                        await _respond(writer, 200, {"node": "mediarelay", **relay.load()})
                    elif method == "POST" and len(parts) == 5 and parts[0] == "rooms" and parts[4] == "offer":
                        offer = json.loads(body)
                        sdp, type_ = await relay.offer(parts[1], parts[3], offer["sdp"], offer["type"])
                        await _respond(writer, 200, {"sdp": sdp, "type": type_})
                    elif method == "DELETE" and len(parts) == 2 and parts[0] == "rooms":
                        await relay.close_room(parts[1])
                        await _respond(writer, 204)
                    else:
                        await _respond(writer, 404, {"reason": "not_found", "detail": path})
                except PermissionError:
                    await _respond(writer, 409, {"reason": "room_full", "detail": "two participants already"})
                except (ValueError, KeyError) as exc:
                    await _respond(writer, 400, {"reason": "invalid_offer", "detail": str(exc)})
        except (ConnectionError, asyncio.IncompleteReadError, ValueError):
            pass
        finally:
            writer.close()

    return await asyncio.start_server(handle, host, port)


async def main() -> None:
    secret = os.environ["SFU_SECRET"]
    host, _, port = os.environ.get("SFU_LISTEN", "127.0.0.1:8101").rpartition(":")
    addresses = [a.strip() for a in os.environ.get("RTC_HOST_ADDRESSES", "127.0.0.1").split(",") if a.strip()]
    use_host_addresses(addresses)
    relay = Relay()
    server = await serve(relay, secret, host or "127.0.0.1", int(port))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with server:
        await stop.wait()
    with contextlib.suppress(Exception):
        async with asyncio.timeout(5):
            await asyncio.gather(*(relay.close_room(r) for r in list(relay.rooms)))


if __name__ == "__main__":
    asyncio.run(main())
