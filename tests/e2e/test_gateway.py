"""The realtime gateway with real WebSocket clients against real server processes."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import uuid
from collections.abc import Callable
from typing import Any

import httpx
import pytest
import websockets
from litestar.testing import AsyncTestClient
from websockets.asyncio.client import ClientConnection

from app.settings import Settings
from tests.conftest import Session
from tests.e2e.conftest import servers

WAIT = 10.0  # seconds an expected frame may take before the test fails


def ws_url(base: str, who: Session) -> str:
    return base.replace("http://", "ws://") + f"/api/v1/ws?token={who.access}"


async def frames_until(socket: ClientConnection, wanted: Callable[[dict[str, Any]], bool]) -> list[dict[str, Any]]:
    """Every frame up to and including the first one `wanted` accepts."""
    seen = []
    while True:
        frame = json.loads(await asyncio.wait_for(socket.recv(), WAIT))
        seen.append(frame)
        if wanted(frame):
            return seen


async def nothing_pending(socket: ClientConnection) -> list[dict[str, Any]]:
    """A ping's pong comes after whatever was already queued for the socket: return what came before it."""
    await socket.send(json.dumps({"type": "ping"}))
    return (await frames_until(socket, lambda f: f["type"] == "pong"))[:-1]


async def post(base: str, who: Session, path: str, body: dict[str, Any]) -> httpx.Response:
    async with httpx.AsyncClient(base_url=base, headers=who.headers) as http:
        return await http.post(path, json=body)


@pytest.fixture
async def open_chat(client: AsyncTestClient[Any], specialist: Callable[..., Any], service: Callable[..., Any],
                    patient: Session, book: Callable[..., Any], staff: Callable[..., Any]) -> dict[str, Any]:
    doctor, visit_type = await specialist(), await service()
    visit = (await book(patient, doctor, visit_type)).json()
    registrar = await staff("registrar")
    await client.post(f"/api/v1/consultations/{visit['id']}/confirm", headers=registrar.headers)
    return {"doctor": doctor, "patient": patient, "conversation_id": visit["conversation_id"]}


async def send(base: str, who: Session, conversation_id: str, text: str) -> dict[str, Any]:
    answer = await post(base, who, f"/api/v1/chats/{conversation_id}/messages",
                        {"client_id": uuid.uuid4().hex, "text": text})
    assert answer.status_code == 201, answer.text
    body: dict[str, Any] = answer.json()
    return body


async def test_patient_and_doctor_talk_live_across_processes(api: list[str], open_chat: dict[str, Any]) -> None:
    patient_base, doctor_base = api[0], api[-1]
    doctor, patient, conversation = open_chat["doctor"], open_chat["patient"], open_chat["conversation_id"]
    async with websockets.connect(ws_url(patient_base, patient)) as patient_ws, \
            websockets.connect(ws_url(doctor_base, doctor)) as doctor_ws:
        await nothing_pending(patient_ws)  # both sockets are registered before anything is sent
        await nothing_pending(doctor_ws)
        sent = await send(doctor_base, doctor, conversation, "The doctor is ready for you")
        got = await frames_until(patient_ws, lambda f: f["type"] == "message.new")
        # the event carries the message as REST shaped it; its time in UTC (an event has many readers), where
        # the REST answer speaks the caller's zone: the same instant
        event, answered = dict(got[-1]["data"]), dict(sent)
        at, answered_at = event.pop("created_at"), answered.pop("created_at")
        assert at.endswith("Z")
        assert dt.datetime.fromisoformat(at) == dt.datetime.fromisoformat(answered_at)
        assert event == answered
        answer = await send(patient_base, patient, conversation, "Coming!")
        to_doctor = await frames_until(doctor_ws,
                                       lambda f: f["type"] == "message.new" and f["data"]["text"] == "Coming!")
        # the author's own devices hear their message too, so web and mobile show the same chat
        assert [f["data"]["text"] for f in to_doctor if f["type"] == "message.new"] == [sent["text"], "Coming!"]
        read = await post(patient_base, patient, f"/api/v1/chats/{conversation}/read",
                          {"up_to_message_id": sent["id"]})
        assert read.status_code == 204
        receipt = (await frames_until(doctor_ws, lambda f: f["type"] == "message.read"))[-1]
        assert receipt["data"]["up_to_message_id"] == sent["id"]
        async with httpx.AsyncClient(base_url=doctor_base, headers=doctor.headers) as http:
            rows = (await http.get("/api/v1/chats")).json()["items"]
        assert rows[0]["online"] is True  # the patient's socket is on the other process
        assert answer["author_id"] == str(patient.id)


async def test_resume_replays_what_was_missed_in_order_exactly_once(
    api: list[str], open_chat: dict[str, Any]
) -> None:
    doctor, patient, conversation = open_chat["doctor"], open_chat["patient"], open_chat["conversation_id"]
    async with websockets.connect(ws_url(api[0], patient)) as socket:
        await nothing_pending(socket)
        await send(api[-1], doctor, conversation, "before the tunnel")
        last_seen = (await frames_until(socket, lambda f: f["type"] == "message.new"))[-1]["id"]
    texts = [f"missed {i}" for i in range(20)]
    for text in texts:
        await send(api[-1], doctor, conversation, text)
    async with websockets.connect(ws_url(api[0], patient)) as socket:
        await socket.send(json.dumps({"type": "resume", "data": {"last_event_id": last_seen}}))
        replayed = []
        while len(replayed) < 20:
            frame = json.loads(await asyncio.wait_for(socket.recv(), WAIT))
            assert frame["type"] == "message.new", frame
            replayed.append(frame)
        assert [f["data"]["text"] for f in replayed] == texts
        ids = [int(f["id"]) for f in replayed]
        assert ids == sorted(ids)
        assert ids[0] == int(last_seen) + 1
        assert await nothing_pending(socket) == []  # no duplicates behind them
        await send(api[-1], doctor, conversation, "live again")
        live = await frames_until(socket, lambda f: f["type"] == "message.new")
        assert [f["data"]["text"] for f in live] == ["live again"]
        assert int(live[0]["id"]) == ids[-1] + 1


async def test_a_methodist_and_a_stranger_receive_no_chat_events(
    api: list[str], open_chat: dict[str, Any], staff: Callable[..., Any], login: Callable[[str], Any],
    new_phone: Callable[[], str],
) -> None:
    methodist, stranger = await staff("methodist"), await login(new_phone())
    doctor, conversation = open_chat["doctor"], open_chat["conversation_id"]
    async with websockets.connect(ws_url(api[0], methodist)) as m_ws, \
            websockets.connect(ws_url(api[0], stranger)) as s_ws:
        await nothing_pending(m_ws)
        await nothing_pending(s_ws)
        await send(api[-1], doctor, conversation, "confidential")
        # the message's own recipient gets it; by then the others would have too, had it been sent to them
        async with websockets.connect(ws_url(api[0], open_chat["patient"])) as p_ws:
            await p_ws.send(json.dumps({"type": "resume", "data": {"last_event_id": 0}}))
            await frames_until(p_ws, lambda f: f["type"] == "message.new" and f["data"]["text"] == "confidential")
        assert await nothing_pending(m_ws) == []
        assert await nothing_pending(s_ws) == []


async def test_a_socket_needs_a_valid_token(api: list[str], patient: Session) -> None:
    base = api[0].replace("http://", "ws://") + "/api/v1/ws"
    for url in (base, base + "?token=garbage", base + "?token=" + patient.access[:-2] + "xx"):
        with pytest.raises(websockets.exceptions.WebSocketException):
            async with websockets.connect(url) as socket:
                await asyncio.wait_for(socket.recv(), WAIT)


async def test_a_silent_socket_is_closed_and_bad_frames_answered(test_settings: Settings, patient: Session) -> None:
    async with servers(test_settings, 1, WS_HEARTBEAT_SECONDS="0.5", METRICS_TOKEN="m") as (base,):
        async with websockets.connect(ws_url(base, patient)) as socket:
            await socket.send("not json")
            assert json.loads(await asyncio.wait_for(socket.recv(), WAIT)) == {
                "type": "error", "data": {"reason": "invalid_frame"}}
            await socket.send(json.dumps({"type": "resume", "data": {"last_event_id": "x"}}))
            assert json.loads(await asyncio.wait_for(socket.recv(), WAIT))["data"]["reason"] == "invalid_event_id"
            with pytest.raises(websockets.exceptions.ConnectionClosed) as closed:
                await asyncio.wait_for(socket.recv(), WAIT)
        assert closed.value.rcvd is not None
        assert closed.value.rcvd.code == 4408
        async with httpx.AsyncClient() as http:
            metrics = (await http.get(f"{base}/metrics", headers={"Authorization": "Bearer m"})).text
        assert 'clinic_websockets_closed_by_server_total{reason="idle"} 1.0' in metrics


async def test_a_confirmation_reaches_the_patient_live_and_opens_the_chat(
    api: list[str], specialist: Callable[..., Any], service: Callable[..., Any], patient: Session,
    book: Callable[..., Any], staff: Callable[..., Any],
) -> None:
    doctor, visit_type = await specialist(), await service()
    visit = (await book(patient, doctor, visit_type)).json()
    registrar = await staff("registrar")
    async with websockets.connect(ws_url(api[0], patient)) as socket:
        await nothing_pending(socket)
        confirmed = await post(api[-1], registrar, f"/api/v1/consultations/{visit['id']}/confirm", {})
        assert confirmed.status_code == 200, confirmed.text
        seen: set[str] = set()
        frames = await frames_until(socket, lambda f: seen.add(f["type"]) or {  # type: ignore[func-returns-value]
            "consultation.updated", "conversation.opened"} <= seen)
    updated = next(f for f in frames if f["type"] == "consultation.updated")
    opened = next(f for f in frames if f["type"] == "conversation.opened")
    assert (updated["data"]["consultation_id"], updated["data"]["status"]) == (visit["id"], "confirmed")
    assert opened["data"] == {**opened["data"], "conversation_id": visit["conversation_id"], "writable": True}
