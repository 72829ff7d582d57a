"""The browser call page (`GET /call`) in headless Chromium as the patient, against a real server process whose
SFU offers only the loopback address, with an aiortc peer as the doctor."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest
import websockets
from aiortc import RTCSessionDescription
from litestar.testing import AsyncTestClient
from playwright.async_api import Browser, Page, WebSocketRoute

from app.rtc.sfu.ice import loopback_candidates
from app.settings import Settings
from tests.conftest import Session
from tests.e2e.browser import Peer, chromium
from tests.e2e.conftest import servers
from tests.e2e.test_gateway import frames_until, ws_url

WAIT = 15.0  # seconds a page state or a frame count may take before the test fails
FRAMES = 20  # frames the doctor must receive of each kind: about a second of the fake camera's 20 fps

# getStats has no event to wait on: the page reads it until the count passes n (wait_for_function would take an
# async predicate's promise itself for true)
DECODED_BEYOND = """async (n) => {
  for (;;) {
    const frames = await window.inboundVideoFrames();
    if (frames > n) return frames;
    await new Promise((resolve) => setTimeout(resolve, 50));
  }
}"""
# the browser's own signal, given as a hidden tab gives it (a headless page is always shown)
SET_HIDDEN = """(hidden) => {
  Object.defineProperty(document, "hidden", { configurable: true, get: () => hidden });
  Object.defineProperty(document, "visibilityState", { configurable: true, get: () => hidden ? "hidden" : "visible" });
  document.dispatchEvent(new Event("visibilitychange"));
}"""


@pytest.fixture(scope="module")
async def call_server(test_settings: Settings) -> AsyncIterator[str]:
    """One API process whose in-process SFU offers only 127.0.0.1 (the page and the doctor are on loopback)."""
    async with servers(test_settings, 1, RTC_HOST_ADDRESSES="127.0.0.1") as urls:
        yield urls[0]


@pytest.fixture(scope="module")
async def browser() -> AsyncIterator[Browser]:
    async with chromium() as started:
        yield started


@pytest.fixture
async def page(browser: Browser) -> AsyncIterator[Page]:
    """A fresh browser context (no storage shared with other tests); its uncaught errors fail the test."""
    context = await browser.new_context()
    opened = await context.new_page()
    errors: list[str] = []
    opened.on("pageerror", lambda error: errors.append(str(error)))
    opened.on("console", lambda m: errors.append(m.text) if "Content Security Policy" in m.text else None)
    try:
        yield opened
    finally:
        await context.close()
    assert errors == []


@pytest.fixture
async def online_visit(patient: Session, specialist: Callable[..., Any], service: Callable[..., Any],
                       visit_until: Callable[..., Any]) -> tuple[Session, dict[str, Any]]:
    """A doctor and a confirmed online consultation of theirs with the patient (after an in-person one)."""
    doctor, visit_type = await specialist(), await service()
    await visit_until(patient, doctor, visit_type, "completed", nth=1)
    return doctor, await visit_until(patient, doctor, visit_type, nth=2, fmt="online")


async def phase(page: Page, wanted: str) -> None:
    await page.wait_for_function("(wanted) => window.callState === wanted", arg=wanted, timeout=WAIT * 1000)


async def decoded_beyond(page: Page, frames: int) -> int:
    """Wait until the page has decoded more than `frames` inbound video frames; returns how many."""
    decoded: int = await asyncio.wait_for(page.evaluate(DECODED_BEYOND, frames), WAIT)
    return decoded


async def presence(page: Page, hidden: bool) -> None:
    """Hide or show the tab, and wait until the server has the page's presence frame."""
    await page.evaluate(SET_HIDDEN, hidden)
    await page.wait_for_function("(wanted) => window.callInfo.presence === wanted",
                                 arg="background" if hidden else "foreground", timeout=WAIT * 1000)


async def sign_in(page: Page, base: str, who: Session) -> None:
    await page.goto(f"{base}/call#token={who.access}")
    await phase(page, "online")
    assert "token" not in page.url  # the fragment is dropped from the address bar and the history


async def test_the_page_is_served_with_a_strict_policy(call_server: str, page: Page) -> None:
    answer = await page.goto(f"{call_server}/call")
    assert answer is not None
    assert answer.ok
    policy = answer.headers["content-security-policy"]
    for rule in ("script-src 'self'", "connect-src 'self'", "form-action 'none'", "frame-ancestors 'none'"):
        assert rule in policy
    assert answer.headers["referrer-policy"] == "no-referrer"
    await phase(page, "signed_out")  # no token given: the sign-in form


async def test_a_patient_in_the_browser_takes_the_doctors_call_through_the_sfu(
    call_server: str, page: Page, browser: Browser, patient: Session, online_visit: tuple[Session, dict[str, Any]],
) -> None:
    """The page rings on the doctor's call and accepts (the patient's other open page stops ringing); media
    flows both ways through the SFU between Chromium and an aiortc doctor; the page's mute reaches the doctor;
    the doctor's hang-up ends the page's call."""
    doctor, visit = online_visit
    peer = Peer()
    elsewhere = await browser.new_context()  # the same patient on another computer
    with loopback_candidates():
        async with httpx.AsyncClient(base_url=call_server, headers=doctor.headers) as api, \
                websockets.connect(ws_url(call_server, doctor)) as doctor_socket:
            try:
                other = await elsewhere.new_page()
                await sign_in(other, call_server, patient)
                await sign_in(page, call_server, patient)
                started = await api.post(f"/api/v1/consultations/{visit['id']}/calls")
                assert started.status_code == 201, started.text
                call_id = started.json()["id"]
                assert started.json()["delivered_via"] == "websocket"  # the page is shown: it rings there
                connected = peer.connected()
                offer = await peer.offer()  # the doctor offers while it rings
                answer = await api.post(f"/api/v1/calls/{call_id}/rtc/offer", json={"sdp": offer.sdp, "type": "offer"})
                assert answer.status_code == 200, answer.text
                await peer.pc.setRemoteDescription(RTCSessionDescription(**answer.json()))
                await phase(page, "ringing")
                await phase(other, "ringing")
                assert await page.evaluate("window.callInfo.callId") == call_id
                await page.click("#accept")
                await phase(other, "online")  # call.accepted: answered here, it stops ringing there
                await phase(page, "active")
                await asyncio.wait_for(connected, WAIT)
                first = await decoded_beyond(page, 0)  # the doctor's picture, decoded in the page
                assert await decoded_beyond(page, first) > first  # and still coming
                await asyncio.wait_for(peer.received.reached("video", FRAMES), WAIT)  # the patient's camera
                await asyncio.wait_for(peer.received.reached("audio", FRAMES), WAIT)  # and microphone

                await page.click("#mute-video")
                media = (await frames_until(doctor_socket, lambda f: f["type"] == "call.media"))[-1]["data"]
                assert (media["call_id"], media["audio"], media["video"]) == (call_id, True, False)
                muted = await api.post(f"/api/v1/calls/{call_id}/media", json={"audio": False, "video": True})
                assert muted.status_code == 200, muted.text
                await page.wait_for_function("() => !window.callInfo.remoteMedia.audio", timeout=WAIT * 1000)
                assert "microphone" in await page.inner_text("#remote-media")

                assert (await api.post(f"/api/v1/calls/{call_id}/end")).status_code == 200
                await phase(page, "ended")
                assert await page.evaluate("window.callInfo.endReason") == "completed"
                assert await page.evaluate("window.inboundVideoFrames()") == 0  # its peer connection is gone
                assert (await api.get(f"/api/v1/calls/{call_id}")).json()["end_reason"] == "completed"
            finally:
                await peer.close()
                await elsewhere.close()


async def test_a_hidden_page_lets_the_phone_ring_too(
    call_server: str, page: Page, client: AsyncTestClient[Any], patient: Session,
    online_visit: tuple[Session, dict[str, Any]],
) -> None:
    """A hidden tab tells the server (presence background): the call rings the patient's phone as well as the
    page, and the doctor hanging up ends the page's ring. Shown again, it rings in the page alone, and the
    page's Decline ends the call."""
    doctor, visit = online_visit
    device = await client.post("/api/v1/devices", headers=patient.headers,
                               json={"platform": "android", "push_token": f"phone-{patient.id}"})
    assert device.status_code == 201, device.text
    async with httpx.AsyncClient(base_url=call_server, headers=doctor.headers) as api:
        await sign_in(page, call_server, patient)
        assert await page.evaluate("window.callInfo.presence") == "foreground"

        await presence(page, hidden=True)
        started = await api.post(f"/api/v1/consultations/{visit['id']}/calls")
        assert started.status_code == 201, started.text
        assert started.json()["delivered_via"] == "both"
        await phase(page, "ringing")  # a hidden tab rings too: the patient may come back to it
        assert (await api.post(f"/api/v1/calls/{started.json()['id']}/end")).status_code == 200
        await phase(page, "ended")
        assert await page.evaluate("window.callInfo.endReason") == "cancelled"

        await presence(page, hidden=False)
        started = await api.post(f"/api/v1/consultations/{visit['id']}/calls")
        assert started.status_code == 201, started.text
        assert started.json()["delivered_via"] == "websocket"
        await phase(page, "ringing")
        async with page.expect_response(lambda r: r.url.endswith("/decline")) as declining:
            await page.click("#decline")
        assert (await declining.value).ok
        await phase(page, "online")  # ready for the next call
        call = (await api.get(f"/api/v1/calls/{started.json()['id']}")).json()
        assert (call["state"], call["end_reason"]) == ("ended", "declined")


async def test_a_page_back_online_rings_for_the_call_it_missed(
    call_server: str, page: Page, patient: Session, online_visit: tuple[Session, dict[str, Any]],
) -> None:
    """The page's socket drops with the network; a call starts meanwhile. Back online, the page opens a new
    socket, resumes its stream where it left it and rings."""
    doctor, visit = online_visit
    links: list[tuple[WebSocketRoute, WebSocketRoute]] = []

    def through(page_side: WebSocketRoute) -> None:  # the network between the page and the server
        links.append((page_side, page_side.connect_to_server()))

    await page.route_web_socket("**/api/v1/ws*", through)
    async with httpx.AsyncClient(base_url=call_server, headers=doctor.headers) as api:
        await sign_in(page, call_server, patient)
        first = await api.post(f"/api/v1/consultations/{visit['id']}/calls")  # gives the page a place in its stream
        await phase(page, "ringing")
        assert (await api.post(f"/api/v1/calls/{first.json()['id']}/end")).status_code == 200
        await phase(page, "ended")

        await page.context.set_offline(True)  # no new socket (its ticket) until the network is back
        for side in links[-1]:
            await side.close(code=1001, reason="network lost")
        await page.wait_for_function("() => !window.callInfo.connected", timeout=WAIT * 1000)
        missed = await api.post(f"/api/v1/consultations/{visit['id']}/calls")
        assert missed.status_code == 201, missed.text
        await page.context.set_offline(False)
        await phase(page, "ringing")
        assert await page.evaluate("window.callInfo.callId") == missed.json()["id"]
        assert len(links) == 2  # the page's second socket
