"""The web cabinet (`GET /cabinet`) in headless Chromium against a real server process whose SFU offers only the
loopback address: a doctor signs in by phone, chats live with a patient and attaches a PDF; calls the patient,
whose own cabinet page accepts (video both ways, mute, hang-up) or declines a call that was already ringing when
the page opened; the page refreshes its access token. Screenshots of every step are kept under
var/test-artifacts/cabinet/ (their paths are printed, shown with a failing test's output)."""

from __future__ import annotations

import datetime as dt
import re
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import httpx
import pytest
import websockets
from litestar.testing import AsyncTestClient
from playwright.async_api import Browser, Page

from app.settings import Settings
from tests.conftest import Session, read_code
from tests.e2e.browser import chromium
from tests.e2e.conftest import ROOT, servers
from tests.e2e.test_gateway import frames_until, ws_url
from tests.integration.conftest import ALL_WEEK

WAIT = 15.0  # seconds a page state may take before the test fails
ARTIFACTS = ROOT / "var" / "test-artifacts" / "cabinet"
PDF = b"%PDF-1.4\n1 0 obj\n<< /Type /Catalog >>\nendobj\ntrailer\n<< /Root 1 0 R >>\n%%EOF\n"
DOCTOR_ZONE = "Europe/Moscow"
ACCESS_SECONDS = 900  # the server's access tokens live this long (its setting, given below)
# the remote picture is decoded and moving: its time advances past the value it had
REMOTE_PLAYING = """(after) => {
  const video = document.getElementById("remote");
  return video.videoWidth > 0 && video.readyState >= 2 && video.currentTime > after ? video.currentTime : false;
}"""
LOCAL_TRACK_ENABLED = """(kind) => {
  const stream = document.getElementById("local").srcObject;
  const track = stream && (kind === "audio" ? stream.getAudioTracks() : stream.getVideoTracks())[0];
  return track ? track.enabled : null;
}"""


@pytest.fixture(scope="module")
async def cabinet_server(test_settings: Settings) -> AsyncIterator[str]:
    """One API process whose in-process SFU offers only 127.0.0.1 (both pages are on loopback)."""
    async with servers(test_settings, 1, RTC_HOST_ADDRESSES="127.0.0.1",
                       ACCESS_TOKEN_SECONDS=str(ACCESS_SECONDS)) as urls:
        yield urls[0]


@pytest.fixture(scope="module")
async def browser() -> AsyncIterator[Browser]:
    async with chromium() as started:
        yield started


class Pages:
    """Fresh browser contexts (no storage shared) whose uncaught errors and policy violations fail the test, and
    screenshots of them under ARTIFACTS/<test>/; each page's last state is shot when the test ends."""

    def __init__(self, browser: Browser, folder: Path) -> None:
        self.browser, self.folder = browser, folder
        self.opened: dict[str, Page] = {}
        self.errors: list[str] = []
        folder.mkdir(parents=True, exist_ok=True)

    async def open(self, name: str) -> Page:
        context = await self.browser.new_context(viewport={"width": 1100, "height": 800})
        page = await context.new_page()
        page.on("pageerror", lambda error: self.errors.append(f"{name}: {error}"))
        page.on("console", lambda m: self.errors.append(f"{name}: {m.text}")
                if "Content Security Policy" in m.text else None)
        self.opened[name] = page
        return page

    async def shot(self, name: str, step: str) -> Path:
        path = self.folder / f"{name}-{step}.png"
        await self.opened[name].screenshot(path=str(path), full_page=True)
        print(f"screenshot: {path}")
        return path

    async def close(self) -> None:
        for name, page in self.opened.items():
            try:
                await self.shot(name, "last")
            finally:
                await page.context.close()


@pytest.fixture
async def pages(browser: Browser, request: pytest.FixtureRequest) -> AsyncIterator[Pages]:
    opened = Pages(browser, ARTIFACTS / re.sub(r"\W+", "_", request.node.name))
    try:
        yield opened
    finally:
        await opened.close()
    assert opened.errors == []


@pytest.fixture
def doctor_account(client: AsyncTestClient[Any], admin: Session, new_phone: Callable[[], str]) -> Callable[..., Any]:
    """A doctor with a schedule covering every hour, never signed in: their first sign-in is the browser's."""

    async def make() -> str:
        phone = new_phone()
        made = await client.post("/api/v1/staff", headers=admin.headers, json={
            "phone": phone, "full_name": "Dr Cabinet", "role": "doctor", "specialties": ["endocrinology"]})
        assert made.status_code == 201, made.text
        schedule = await client.put(f"/api/v1/specialists/{made.json()['id']}/schedule", headers=admin.headers,
                                    json={"timezone": DOCTOR_ZONE, "slot_minutes": 30, "horizon_days": 2,
                                          "weekly": ALL_WEEK})
        assert schedule.status_code == 200, schedule.text
        return phone

    return make


async def sign_in_by_phone(page: Page, base: str, settings: Settings, phone: str, view: str) -> Session:
    """Through the page's own form: the code is read from the SMS log the server writes. Returns the page's
    session (from its sessionStorage), for arranging the rest through the API."""
    answer = await page.goto(f"{base}/cabinet")
    assert answer is not None
    assert answer.ok
    await page.fill("#phone", phone)
    async with page.expect_response(lambda r: r.url.endswith("/api/v1/auth/otp")) as sent:
        await page.click("#phone-form button")
    assert (await sent.value).status == 202
    await page.locator("#code").wait_for(timeout=WAIT * 1000)
    assert not await page.is_visible("#phone")
    await page.fill("#code", read_code(settings, phone))
    await page.click("#code-form button")
    await page.wait_for_function("(view) => document.body.dataset.view === view", arg=view, timeout=WAIT * 1000)
    assert phone not in page.url
    return await session_of(page)


async def session_of(page: Page) -> Session:
    kept = await page.evaluate("JSON.parse(sessionStorage.getItem('cabinet.session'))")
    assert kept["access"] not in page.url
    return Session(id=uuid.UUID(kept["user"]["id"]), phone=kept["user"]["phone"], access=kept["access"],
                   refresh=kept["refresh"])


async def phase(page: Page, wanted: str) -> None:
    await page.wait_for_function("(wanted) => window.callState === wanted", arg=wanted, timeout=WAIT * 1000)


async def online_visit(patient: Session, doctor: Session, service: Callable[..., Any],
                       visit_until: Callable[..., Any]) -> dict[str, Any]:
    """A confirmed online consultation (after a completed in-person one, as the rules require)."""
    visit_type = await service()
    await visit_until(patient, doctor, visit_type, "completed", nth=1)
    visit: dict[str, Any] = await visit_until(patient, doctor, visit_type, nth=2, fmt="online")
    return visit


async def open_visit(page: Page, visit: dict[str, Any]) -> None:
    """Pick the visit's day in the doctor's page (today unless the test runs late in the evening; picked again
    when it is today: the visit was booked through the test's in-process app, whose events reach no other
    process on the embedded profile) and open the visit."""
    day = dt.datetime.fromisoformat(visit["starts_at"]).astimezone(ZoneInfo(DOCTOR_ZONE)).date().isoformat()
    await page.fill("#day", day)
    await page.dispatch_event("#day", "change")
    row = page.locator(f'#visits button[data-consultation-id="{visit["id"]}"]')
    async with page.expect_response(lambda r: "/messages?" in r.url) as history:
        await row.click(timeout=WAIT * 1000)
    assert (await history.value).ok


async def remote_video_plays(page: Page) -> None:
    """The other side's picture is decoded (videoWidth > 0) and moving (currentTime advances)."""
    first = await page.wait_for_function(REMOTE_PLAYING, arg=0, timeout=WAIT * 1000)
    await page.wait_for_function(REMOTE_PLAYING, arg=await first.json_value(), timeout=WAIT * 1000)


async def test_the_page_is_served_with_a_strict_policy(cabinet_server: str, pages: Pages) -> None:
    page = await pages.open("anyone")
    answer = await page.goto(f"{cabinet_server}/cabinet")
    assert answer is not None
    assert answer.ok
    policy = answer.headers["content-security-policy"]
    for rule in ("script-src 'self'", "connect-src 'self'", "form-action 'none'", "frame-ancestors 'none'"):
        assert rule in policy
    assert "unsafe-inline" not in policy
    assert answer.headers["referrer-policy"] == "no-referrer"
    assert await page.locator("script:not([src])").count() == 0  # no inline script
    await page.wait_for_function("() => document.body.dataset.view === 'signed_out'", timeout=WAIT * 1000)
    assert await page.is_visible("#phone")
    assert not await page.is_visible("#code")  # the code's form comes once a code is sent
    assert not await page.is_visible("#workspace")


async def test_a_doctor_signs_in_by_phone_and_chats_live_with_an_attachment(
    cabinet_server: str, pages: Pages, test_settings: Settings, patient: Session,
    doctor_account: Callable[..., Any], service: Callable[..., Any], visit_until: Callable[..., Any],
) -> None:
    """The doctor's page lists the day's consultation (it appears as it is booked), opens its chat, shows the
    patient's message as it is sent, and sends a reply and a PDF that the patient's socket and history have."""
    page = await pages.open("doctor")
    doctor = await sign_in_by_phone(page, cabinet_server, test_settings, await doctor_account(), "specialist")
    visit = await online_visit(patient, doctor, service, visit_until)
    await open_visit(page, visit)
    assert await page.is_visible("#start-call")  # an online, confirmed visit: the doctor may call
    await pages.shot("doctor", "chat-open")

    conversation = visit["conversation_id"]
    async with httpx.AsyncClient(base_url=cabinet_server, headers=patient.headers) as api, \
            websockets.connect(ws_url(cabinet_server, patient)) as patient_socket:
        hello = f"Good morning, doctor <b>{uuid.uuid4().hex[:6]}</b>"  # markup stays text
        sent = await api.post(f"/api/v1/chats/{conversation}/messages",
                              json={"client_id": uuid.uuid4().hex, "text": hello})
        assert sent.status_code == 201, sent.text
        live = page.locator(f'#messages li[data-id="{sent.json()["id"]}"]')
        await live.wait_for(timeout=WAIT * 1000)  # the history was read before it was sent: the socket brought it
        assert hello in await live.inner_text()
        assert await page.locator("#messages b").count() == 0

        await page.fill("#message-text", "Hello, how are you feeling?")
        await page.click("#send")
        reply = (await frames_until(patient_socket, lambda f: f["type"] == "message.new"
                                    and f["data"]["text"] == "Hello, how are you feeling?"))[-1]["data"]
        assert reply["author_id"] == str(doctor.id)

        await page.fill("#message-text", "Your referral")
        await page.set_input_files("#attachment", files=[
            {"name": "referral.pdf", "mimeType": "application/pdf", "buffer": PDF}])
        await page.click("#send")
        attached = (await frames_until(patient_socket, lambda f: f["type"] == "message.new"
                                       and f["data"]["text"] == "Your referral"))[-1]["data"]
        assert [(d["filename"], d["content_type"]) for d in attached["documents"]] == [
            ("referral.pdf", "application/pdf")]
        await page.locator(f'#messages li[data-id="{attached["id"]}"] .attachment').wait_for(timeout=WAIT * 1000)
        await pages.shot("doctor", "chat-sent")

        history = (await api.get(f"/api/v1/chats/{conversation}/messages")).json()["items"]
        seen = next(m for m in history if m["id"] == attached["id"])
        assert seen["document_ids"] == [attached["documents"][0]["id"]]
        document = (await api.get(f"/api/v1/documents/{seen['document_ids'][0]}")).json()
        assert (document["patient_id"], document["status"], document["author_role"]) == (
            str(patient.id), "ready", "doctor")


async def test_the_doctor_calls_and_the_patients_page_accepts_with_video_mute_and_hang_up(
    cabinet_server: str, pages: Pages, test_settings: Settings, new_phone: Callable[[], str],
    doctor_account: Callable[..., Any], service: Callable[..., Any], visit_until: Callable[..., Any],
) -> None:
    """Chromium to Chromium through the SFU: the doctor's page starts the call, the patient's page rings and
    accepts; both remote videos play; the doctor's mute turns its microphone track off and the patient hears of
    it; the doctor's hang-up ends the call on both pages."""
    patient_page, page = await pages.open("patient"), await pages.open("doctor")
    patient = await sign_in_by_phone(patient_page, cabinet_server, test_settings, new_phone(), "patient")
    await phase(patient_page, "online")
    doctor = await sign_in_by_phone(page, cabinet_server, test_settings, await doctor_account(), "specialist")
    visit = await online_visit(patient, doctor, service, visit_until)
    await open_visit(page, visit)

    async with page.expect_response(lambda r: r.url.endswith("/calls") and r.request.method == "POST") as started:
        await page.click("#start-call")
    call = await (await started.value).json()
    assert call["delivered_via"] == "websocket"  # the patient's page is open and shown
    await phase(patient_page, "ringing")
    assert await patient_page.evaluate("window.callInfo.callId") == call["id"]
    await pages.shot("patient", "ringing")
    await patient_page.click("#accept")
    await phase(patient_page, "active")
    await phase(page, "active")
    await remote_video_plays(patient_page)  # the doctor's fake camera, through the SFU
    await remote_video_plays(page)  # and the patient's
    await pages.shot("doctor", "in-call")
    await pages.shot("patient", "in-call")

    assert await page.evaluate(LOCAL_TRACK_ENABLED, "audio") is True
    await page.click("#mute-audio")
    assert await page.evaluate(LOCAL_TRACK_ENABLED, "audio") is False
    assert await page.get_attribute("#mute-audio", "aria-pressed") == "true"
    await patient_page.wait_for_function("() => !window.callInfo.remoteMedia.audio", timeout=WAIT * 1000)
    assert "microphone" in await patient_page.inner_text("#remote-media")
    await patient_page.click("#mute-video")
    assert await patient_page.evaluate(LOCAL_TRACK_ENABLED, "video") is False
    await page.wait_for_function("() => !window.callInfo.remoteMedia.video", timeout=WAIT * 1000)
    await page.click("#mute-audio")
    assert await page.evaluate(LOCAL_TRACK_ENABLED, "audio") is True

    await page.click("#hangup")
    await phase(page, "ended")
    await phase(patient_page, "ended")  # call.ended reached the patient's page
    assert await patient_page.evaluate("window.callInfo.endReason") == "completed"
    assert await patient_page.evaluate("window.inboundVideoFrames()") == 0  # its peer connection is gone
    async with httpx.AsyncClient(base_url=cabinet_server, headers=patient.headers) as api:
        ended = (await api.get(f"/api/v1/calls/{call['id']}")).json()
    assert (ended["state"], ended["end_reason"]) == ("ended", "completed")


async def test_a_patients_page_opened_while_the_call_rings_declines_it(
    cabinet_server: str, pages: Pages, test_settings: Settings, new_phone: Callable[[], str],
    doctor_account: Callable[..., Any], service: Callable[..., Any], visit_until: Callable[..., Any],
) -> None:
    """The patient's tab is away when the doctor's page calls; back on the cabinet (still signed in, from the
    tab's sessionStorage) it finds the ringing call through the live calls and rings; Decline ends the call, and
    the doctor's page shows it declined."""
    patient_page, page = await pages.open("patient"), await pages.open("doctor")
    patient = await sign_in_by_phone(patient_page, cabinet_server, test_settings, new_phone(), "patient")
    doctor = await sign_in_by_phone(page, cabinet_server, test_settings, await doctor_account(), "specialist")
    visit = await online_visit(patient, doctor, service, visit_until)
    await patient_page.goto("about:blank")  # the tab went elsewhere: no socket of the patient's is open

    await open_visit(page, visit)
    async with page.expect_response(lambda r: r.url.endswith("/calls") and r.request.method == "POST") as started:
        await page.click("#start-call")
    call = await (await started.value).json()
    assert (await started.value).ok, call
    # (delivered_via is "none" once the server has seen the old page's socket close; either way the page loaded
    # next has no place in its stream to resume from: only the live calls can tell it the call rings)

    await patient_page.goto(f"{cabinet_server}/cabinet")
    await patient_page.wait_for_function("() => document.body.dataset.view === 'patient'", timeout=WAIT * 1000)
    await phase(patient_page, "ringing")
    assert await patient_page.evaluate("window.callInfo.callId") == call["id"]
    await pages.shot("patient", "ringing")
    async with patient_page.expect_response(lambda r: r.url.endswith("/decline")) as declining:
        await patient_page.click("#decline")
    assert (await declining.value).ok
    await phase(page, "ended")
    assert await page.evaluate("window.callInfo.endReason") == "declined"
    assert "declined" in await page.inner_text("#status")
    await pages.shot("doctor", "declined")


async def test_the_page_refreshes_its_access_token_before_it_runs_out_and_on_a_401(
    cabinet_server: str, pages: Pages, test_settings: Settings, new_phone: Callable[[], str],
) -> None:
    """At 80 % of the access token's life (the page's clock moved on) the page rotates its pair and goes on with
    the new one. Reloaded with an access token the server refuses, its first request's 401 refreshes once and the
    request is retried; the call client, handed the new token, opens its socket with it."""
    page = await pages.open("patient")
    await page.clock.install()
    first = await sign_in_by_phone(page, cabinet_server, test_settings, new_phone(), "patient")
    await phase(page, "online")
    async with page.expect_response(lambda r: r.url.endswith("/api/v1/auth/refresh")) as rotated:
        await page.clock.fast_forward(int(ACCESS_SECONDS * 0.8 * 1000) + 1000)
    assert (await rotated.value).ok
    await page.wait_for_function("() => window.cabinetInfo.refreshes === 1", timeout=WAIT * 1000)
    second = await session_of(page)
    assert (second.access, second.refresh) != (first.access, first.refresh)
    async with httpx.AsyncClient(base_url=cabinet_server) as http:  # the page's new access token works
        me = await http.get("/api/v1/me", headers=second.headers)
        assert (me.status_code, me.json()["id"]) == (200, str(first.id))

    await page.evaluate("""() => {
      const kept = JSON.parse(sessionStorage.getItem("cabinet.session"));
      kept.access = "not-a-token";
      sessionStorage.setItem("cabinet.session", JSON.stringify(kept));
    }""")
    async with page.expect_response(lambda r: r.url.endswith("/api/v1/auth/refresh")) as refreshed:
        await page.reload()
    assert (await refreshed.value).ok
    await page.wait_for_function("() => document.body.dataset.view === 'patient'", timeout=WAIT * 1000)
    await page.wait_for_function("() => window.callInfo.connected", timeout=WAIT * 1000)
    await page.locator("#no-chats").wait_for(timeout=WAIT * 1000)  # the retried chat list: none yet
    assert await page.evaluate("window.cabinetInfo.refreshes") == 1
    assert (await session_of(page)).refresh != second.refresh
