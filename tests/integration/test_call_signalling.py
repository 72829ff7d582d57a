"""Call signalling beyond the plain offer: trickled ICE candidates (REST and socket), the offer rate limit, and the
socket staying responsive while an offer waits on the SFU (one offer in flight per socket)."""

from __future__ import annotations

import contextlib
import json
import re
import threading
from collections.abc import AsyncIterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import msgspec
import websockets
from aiortc import RTCSessionDescription
from litestar.testing import AsyncTestClient
from redis.asyncio import Redis

from app.rtc.placement import NodeStatus, register
from app.rtc.sfu.ice import loopback_candidates
from app.settings import Settings
from tests.conftest import refused, running
from tests.e2e.test_gateway import frames_until, ws_url
from tests.integration.sfu_peers import Peer
from tests.integration.test_calls import Visit, act, offer_sdp, start, visit  # noqa: F401  (visit: the fixture)
from tests.integration.test_outbox_worker import sockets_at
from tests.sfu_nodes import SECRET

MEDIA = {"rtc_host_addresses": "127.0.0.1", "rtc_udp_ports": "21700-21799"}


def split(sdp: str) -> tuple[str, list[str]]:
    """An offer without its candidates (a browser's, before gathering ends) and the candidates' lines."""
    lines = re.findall(r"^a=(candidate:.*?)\r?$", sdp, flags=re.MULTILINE)
    return re.sub(r"^a=(candidate:.*|end-of-candidates)\r?\n", "", sdp, flags=re.MULTILINE), lines


async def test_a_trickling_client_connects_with_candidates_sent_after_its_offer(
    test_settings: Settings, client: AsyncTestClient[Any], visit: Visit,  # noqa: F811
) -> None:
    settings = msgspec.structs.replace(test_settings, **MEDIA)
    with loopback_candidates():
        async with running(settings) as clinic:
            call = await start(clinic, visit)
            assert (await act(clinic, visit.patient, call["id"], "accept")).status_code == 200
            doctor, patient = Peer("doctor"), Peer("patient")
            try:
                for peer, who in ((doctor, visit.doctor), (patient, visit.patient)):
                    peer._setup()
                    await peer.pc.setLocalDescription(await peer.pc.createOffer())
                    bare, lines = split(peer.pc.localDescription.sdp)
                    assert lines
                    answer = await clinic.post(f"/api/v1/calls/{call['id']}/rtc/offer", headers=who.headers,
                                               json={"sdp": bare, "type": "offer"})
                    assert answer.status_code == 200, answer.text
                    await peer.pc.setRemoteDescription(RTCSessionDescription(**answer.json()))
                    if peer is patient:  # over REST
                        for line in [*lines, None]:
                            sent = await clinic.post(f"/api/v1/calls/{call['id']}/rtc/candidate",
                                                     headers=who.headers, json={"candidate": line})
                            assert sent.status_code == 204, sent.text
                    else:  # over the socket
                        async with sockets_at(clinic) as base, websockets.connect(ws_url(base, who)) as socket:
                            for line in [*lines, None]:
                                await socket.send(json.dumps({"type": "rtc.candidate", "data": {
                                    "call_id": call["id"], "candidate": line}}))
                            await socket.send(json.dumps({"type": "rtc.candidate", "data": {
                                "call_id": call["id"], "candidate": "candidate:nonsense"}}))
                            error = (await frames_until(socket, lambda f: f["type"] == "error"))[-1]
                            assert error["data"] == {"reason": "invalid_candidate", "call_id": call["id"]}
                await patient.frames_reach("video", 5)
                await doctor.frames_reach("video", 5)
            finally:
                await doctor.close()
                await patient.close()
            url = f"/api/v1/calls/{call['id']}/rtc/candidate"
            refused(await clinic.post(url, headers=visit.patient.headers, json={"candidate": "x" * 2000}), 422,
                    "invalid_candidate")
            assert (await act(clinic, visit.doctor, call["id"], "end")).status_code == 200
            refused(await clinic.post(url, headers=visit.patient.headers, json={"candidate": None}), 409,
                    "call_ended")


async def test_offers_are_rate_limited_per_user(
    test_settings: Settings, client: AsyncTestClient[Any], visit: Visit,  # noqa: F811
) -> None:
    settings = msgspec.structs.replace(test_settings, rtc_offers_per_minute=2)
    async with running(settings) as clinic:
        call = await start(clinic, visit)
        url = f"/api/v1/calls/{call['id']}/rtc/offer"
        sdp = await offer_sdp()
        for _ in range(2):
            answer = await clinic.post(url, headers=visit.doctor.headers, json={"sdp": sdp, "type": "offer"})
            assert answer.status_code == 200, answer.text
        too_many = await clinic.post(url, headers=visit.doctor.headers, json={"sdp": sdp, "type": "offer"})
        refused(too_many, 429, "too_many_offers")
        assert int(too_many.headers["Retry-After"]) >= 1
        async with sockets_at(clinic) as base, websockets.connect(ws_url(base, visit.doctor)) as socket:
            await socket.send(json.dumps({"type": "rtc.offer", "data": {"call_id": call["id"], "sdp": sdp}}))
            error = (await frames_until(socket, lambda f: f["type"] in ("error", "rtc.answer")))[-1]
            assert error["data"] == {"reason": "too_many_offers", "call_id": call["id"]}
        # another user's budget is their own
        assert (await act(clinic, visit.patient, call["id"], "accept")).status_code == 200
        answer = await clinic.post(url, headers=visit.patient.headers, json={"sdp": sdp, "type": "offer"})
        assert answer.status_code == 200, answer.text


@contextlib.asynccontextmanager
async def slow_node(settings: Settings) -> AsyncIterator[tuple[str, str, threading.Event]]:
    """An SFU node that is alive (it answers its health check and is registered) but holds every offer until the
    event is set (then answers 503): an offer in flight for as long as the test needs. Served from threads of its
    own: the test client's requests block this loop while they run."""
    release = threading.Event()

    class Handler(BaseHTTPRequestHandler):
        def _send(self, code: int, body: bytes) -> None:
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:
            self._send(200, msgspec.json.encode(NodeStatus(node=name, rooms=0, participants=0, streams=0)))

        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            release.wait(60)
            self._send(503, b'{"reason":"internal_error","detail":"held"}')

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    url = f"http://127.0.0.1:{server.server_address[1]}"
    name = f"{url}#51011011"
    serving = threading.Thread(target=server.serve_forever, daemon=True)
    serving.start()
    if settings.redis_url:
        redis = Redis.from_url(settings.redis_url)
        try:
            await register(redis, name, msgspec.json.encode(NodeStatus(name, 0, 0, 0)), 60.0)
        finally:
            await redis.aclose()
    try:
        yield url, name, release
    finally:
        release.set()
        server.shutdown()
        server.server_close()


async def test_the_socket_answers_while_an_offer_waits_and_refuses_a_second_offer(
    test_settings: Settings, client: AsyncTestClient[Any], visit: Visit,  # noqa: F811
) -> None:
    async with slow_node(test_settings) as (url, name, release):
        settings = msgspec.structs.replace(test_settings, sfu_urls=url, sfu_secret=SECRET, sfu_timeout_seconds=60.0)
        async with running(settings) as clinic:
            call = await start(clinic, visit)
            sdp = await offer_sdp()
            async with sockets_at(clinic) as base, websockets.connect(ws_url(base, visit.doctor)) as socket:
                offer = {"type": "rtc.offer", "data": {"call_id": call["id"], "sdp": sdp}}
                await socket.send(json.dumps(offer))
                await socket.send(json.dumps({"type": "ping"}))
                seen = await frames_until(socket, lambda f: f["type"] == "pong")  # not held behind the offer
                assert all(f["type"] != "rtc.answer" for f in seen)
                await socket.send(json.dumps(offer))
                error = (await frames_until(socket, lambda f: f["type"] == "error"))[-1]
                assert error["data"] == {"reason": "offer_in_progress", "call_id": call["id"]}
                release.set()  # the node answers the first offer at last (with a refusal)
                error = (await frames_until(socket, lambda f: f["type"] == "error"))[-1]
                assert error["data"] == {"reason": "sfu_unavailable", "call_id": call["id"]}
                await socket.send(json.dumps(offer))  # nothing in flight now: taken (and answered at once)
                error = (await frames_until(socket, lambda f: f["type"] == "error"))[-1]
                assert error["data"] == {"reason": "sfu_unavailable", "call_id": call["id"]}
        assert name
