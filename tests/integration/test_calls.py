"""Calls over REST and the realtime socket: who starts and answers, one live call per consultation, the first
device to accept wins, declining and ending, the ring timeout (missed, once, whichever instance expires it),
media switches reaching the other side, and offers answered by the SFU."""

from __future__ import annotations

import asyncio
import json
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from uuid import UUID

import msgspec
import pytest
import websockets
from litestar.testing import AsyncTestClient
from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.chat.models import Message, UserEvent
from app.outbox import OutboxEvent
from app.rtc.models import Call
from app.rtc.service import MISSED_TEXT
from app.settings import Settings
from tests.conftest import Session, refused, running
from tests.e2e.test_gateway import frames_until, nothing_pending, ws_url
from tests.harness import free_port
from tests.integration.test_outbox_worker import eventually, sockets_at

Maker = async_sessionmaker[AsyncSession]


@dataclass
class Visit:
    doctor: Session
    patient: Session
    id: str
    conversation_id: str


async def online_visit(patient: Session, doctor: Session, service: Callable[..., Any],
                       visit_until: Callable[..., Any], until: str = "confirmed", nth: int = 2) -> Visit:
    """An online consultation: the patient's first visit (in person) completed, the online one `until`."""
    visit_type = await service()
    await visit_until(patient, doctor, visit_type, "completed", nth=nth - 1)
    visit = await visit_until(patient, doctor, visit_type, until, nth=nth, fmt="online")
    assert visit["format"] == "online"
    return Visit(doctor, patient, visit["id"], visit["conversation_id"])


@pytest.fixture
async def visit(patient: Session, specialist: Callable[..., Any], service: Callable[..., Any],
                visit_until: Callable[..., Any]) -> Visit:
    return await online_visit(patient, await specialist(), service, visit_until)


async def start(client: AsyncTestClient[Any], visit: Visit) -> dict[str, Any]:
    answer = await client.post(f"/api/v1/consultations/{visit.id}/calls", headers=visit.doctor.headers)
    assert answer.status_code == 201, answer.text
    body: dict[str, Any] = answer.json()
    return body


async def act(client: AsyncTestClient[Any], who: Session, call_id: str, verb: str) -> Any:
    return await client.post(f"/api/v1/calls/{call_id}/{verb}", headers=who.headers)


async def events(session_maker: Maker, who: UUID, type_: str, call_id: str) -> list[dict[str, Any]]:
    """The `type_` events of this call in the user's stream."""
    async with session_maker() as session:
        rows = (await session.scalars(select(UserEvent.data).where(UserEvent.recipient_id == who,
                                                                   UserEvent.type == type_))).all()
    return [r for r in rows if r.get("call_id") == call_id]


# --- who may start, and when -----------------------------------------------------------------------


async def test_only_the_specialist_of_the_consultation_starts_a_call(
    client: AsyncTestClient[Any], visit: Visit, specialist: Callable[..., Any], staff: Callable[..., Any],
    login: Callable[[str], Any], new_phone: Callable[[], str], session_maker: Maker,
) -> None:
    url = f"/api/v1/consultations/{visit.id}/calls"
    refused(await client.post(url, headers=visit.patient.headers), 403, "not_allowed")
    for stranger in (await login(new_phone()), await specialist(), await staff("registrar")):
        refused(await client.post(url, headers=stranger.headers), 404)
    refused(await client.post("/api/v1/consultations/00000000-0000-0000-0000-000000000000/calls",
                              headers=visit.doctor.headers), 404)
    started = await start(client, visit)
    assert started["state"] == "ringing"
    assert started["consultation_id"] == visit.id
    assert started["delivered_via"] == "none"  # no socket open, no device registered
    [incoming] = await events(session_maker, visit.patient.id, "call.incoming", started["id"])
    assert incoming["consultation_id"] == visit.id
    assert await events(session_maker, visit.doctor.id, "call.incoming", started["id"]) == []
    got = await client.get(f"/api/v1/calls/{started['id']}", headers=visit.patient.headers)
    assert got.status_code == 200, got.text
    assert {k: got.json()[k] for k in ("state", "end_reason", "started_at", "ended_at")} == {
        "state": "ringing", "end_reason": None, "started_at": None, "ended_at": None}
    refused(await client.get(f"/api/v1/calls/{started['id']}", headers=(await login(new_phone())).headers), 404)


async def test_a_call_needs_an_online_consultation_that_is_confirmed_or_under_way(
    client: AsyncTestClient[Any], patient: Session, specialist: Callable[..., Any], service: Callable[..., Any],
    visit_until: Callable[..., Any], book: Callable[..., Any],
) -> None:
    doctor, visit_type = await specialist(), await service()
    pending = (await book(patient, doctor, visit_type, nth=1)).json()  # a first booking awaits confirmation
    assert pending["status"] == "pending_confirmation"
    refused(await client.post(f"/api/v1/consultations/{pending['id']}/calls", headers=doctor.headers), 422,
            "consultation_not_confirmed")
    await client.post(f"/api/v1/consultations/{pending['id']}/cancel", headers=patient.headers)
    await visit_until(patient, doctor, visit_type, "completed", nth=2)
    in_person = await visit_until(patient, doctor, visit_type, nth=3)
    refused(await client.post(f"/api/v1/consultations/{in_person['id']}/calls", headers=doctor.headers), 422,
            "consultation_in_person")
    online = await visit_until(patient, doctor, visit_type, nth=4, fmt="online")
    assert (await client.post(f"/api/v1/consultations/{online['id']}/cancel",
                              headers=patient.headers)).status_code == 200
    refused(await client.post(f"/api/v1/consultations/{online['id']}/calls", headers=doctor.headers), 422,
            "consultation_over")


# --- one live call ---------------------------------------------------------------------------------


async def test_one_live_call_per_consultation(client: AsyncTestClient[Any], visit: Visit) -> None:
    first = await start(client, visit)
    refused(await client.post(f"/api/v1/consultations/{visit.id}/calls", headers=visit.doctor.headers), 409,
            "call_in_progress")
    assert (await act(client, visit.doctor, first["id"], "end")).status_code == 200
    second = await start(client, visit)  # an ended call is no longer live
    assert second["id"] != first["id"]


async def test_two_starts_at_once_make_one_call(client: AsyncTestClient[Any], visit: Visit,
                                                session_maker: Maker) -> None:
    url = f"/api/v1/consultations/{visit.id}/calls"
    answers = await asyncio.gather(*(client.post(url, headers=visit.doctor.headers) for _ in range(4)))
    assert sorted(a.status_code for a in answers) == [201, 409, 409, 409], [a.text for a in answers]
    for answer in answers:
        if answer.status_code == 409:
            assert answer.json()["extra"]["reason"] == "call_in_progress"
    async with session_maker() as session:
        live = await session.scalar(select(func.count()).select_from(Call).where(
            Call.consultation_id == UUID(visit.id), Call.state != "ended"))
    assert live == 1


async def test_the_database_refuses_a_second_live_call(client: AsyncTestClient[Any], visit: Visit,
                                                       session_maker: Maker) -> None:
    """The guard the race relies on: a second live call of a consultation is refused by the partial unique index,
    not only by the read before the insert."""
    started = await start(client, visit)
    async with session_maker() as session:
        first = await session.get(Call, UUID(started["id"]))
        assert first is not None
        same = {"consultation_id": first.consultation_id, "conversation_id": first.conversation_id,
                "specialist_id": first.specialist_id, "patient_id": first.patient_id,
                "ring_deadline": first.ring_deadline, "node": first.node}
        session.add(Call(**same, state="active"))
        with pytest.raises(IntegrityError):
            await session.flush()
        await session.rollback()
        session.add(Call(**same, state="ended", end_reason="missed"))
        await session.flush()  # ended calls are history: any number of them
        await session.rollback()


# --- answering -------------------------------------------------------------------------------------


async def test_the_first_device_to_accept_wins_and_the_others_stop_ringing(
    client: AsyncTestClient[Any], visit: Visit,
) -> None:
    async with sockets_at(client) as url, websockets.connect(ws_url(url, visit.patient)) as phone, \
            websockets.connect(ws_url(url, visit.patient)) as tablet, \
            websockets.connect(ws_url(url, visit.doctor)) as cabinet:
        for socket in (phone, tablet, cabinet):
            await nothing_pending(socket)
        started = await start(client, visit)
        assert started["delivered_via"] == "websocket"  # sockets in the foreground had it
        for socket in (phone, tablet):
            ring = (await frames_until(socket, lambda f: f["type"] == "call.incoming"))[-1]
            assert ring["data"]["call_id"] == started["id"]
        refused(await act(client, visit.doctor, started["id"], "accept"), 403, "not_allowed")
        accepted = await act(client, visit.patient, started["id"], "accept")  # the phone answers
        assert accepted.status_code == 200, accepted.text
        assert accepted.json()["state"] == "active"
        assert accepted.json()["accepted_by"] == str(visit.patient.id)
        assert accepted.json()["started_at"] is not None
        refused(await act(client, visit.patient, started["id"], "accept"), 409, "call_not_ringing")  # the tablet
        for socket in (phone, tablet, cabinet):
            stop = (await frames_until(socket, lambda f: f["type"] == "call.accepted"))[-1]
            assert stop["data"]["call_id"] == started["id"]
            assert stop["data"]["state"] == "active"
        refused(await act(client, visit.patient, started["id"], "decline"), 409, "call_not_ringing")


async def test_a_guardian_answers_a_call_to_their_child(
    client: AsyncTestClient[Any], patient: Session, specialist: Callable[..., Any], service: Callable[..., Any],
    visit_until: Callable[..., Any],
) -> None:
    doctor = await specialist("doctor", ["pediatrics"])
    child = (await client.post("/api/v1/me/dependents", headers=patient.headers, json={
        "full_name": "Tim Testov", "birth_date": "2019-01-01", "relation": "child",
        "legal_basis": "birth certificate"})).json()
    visit_type = await service("pediatrics")
    await visit_until(patient, doctor, visit_type, "completed", nth=1, patient_id=child["id"])
    online = await visit_until(patient, doctor, visit_type, nth=2, fmt="online", patient_id=child["id"])
    started = await start(client, Visit(doctor, patient, online["id"], online["conversation_id"]))
    accepted = await act(client, patient, started["id"], "accept")
    assert accepted.status_code == 200, accepted.text
    assert accepted.json()["accepted_by"] == str(patient.id)


async def test_declining_and_ending(client: AsyncTestClient[Any], visit: Visit, session_maker: Maker) -> None:
    doctor, patient = visit.doctor, visit.patient
    declined = await start(client, visit)
    refused(await act(client, doctor, declined["id"], "decline"), 403, "not_allowed")
    answer = await act(client, patient, declined["id"], "decline")
    assert answer.status_code == 200, answer.text
    assert (answer.json()["state"], answer.json()["end_reason"]) == ("ended", "declined")
    for who in (doctor.id, patient.id):
        assert len(await events(session_maker, who, "call.declined", declined["id"])) == 1
        [ended] = await events(session_maker, who, "call.ended", declined["id"])
        assert ended["end_reason"] == "declined"

    cancelled = await start(client, visit)
    answer = await act(client, doctor, cancelled["id"], "end")  # the doctor hangs up while it rings
    assert (answer.json()["state"], answer.json()["end_reason"]) == ("ended", "cancelled")
    refused(await act(client, patient, cancelled["id"], "accept"), 409, "call_not_ringing")
    [ended] = await events(session_maker, patient.id, "call.ended", cancelled["id"])
    assert ended["end_reason"] == "cancelled"

    completed = await start(client, visit)
    assert (await act(client, patient, completed["id"], "accept")).status_code == 200
    answer = await act(client, patient, completed["id"], "end")  # either side ends an answered call
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert (body["state"], body["end_reason"]) == ("ended", "completed")
    assert body["ended_at"] >= body["started_at"]
    refused(await act(client, doctor, completed["id"], "end"), 409, "call_ended")
    [ended] = await events(session_maker, doctor.id, "call.ended", completed["id"])
    assert ended["end_reason"] == "completed"


async def test_media_switches_reach_the_other_side(client: AsyncTestClient[Any], visit: Visit,
                                                   session_maker: Maker) -> None:
    started = await start(client, visit)
    assert (await act(client, visit.patient, started["id"], "accept")).status_code == 200
    muted = await client.post(f"/api/v1/calls/{started['id']}/media", headers=visit.doctor.headers,
                              json={"audio": False, "video": True})
    assert muted.status_code == 200, muted.text
    [seen] = await events(session_maker, visit.patient.id, "call.media", started["id"])
    assert seen == {"call_id": started["id"], "user_id": str(visit.doctor.id), "audio": False, "video": True}
    assert await events(session_maker, visit.doctor.id, "call.media", started["id"]) == []  # not to itself
    await client.post(f"/api/v1/calls/{started['id']}/media", headers=visit.patient.headers,
                      json={"audio": True, "video": False})
    [seen] = await events(session_maker, visit.doctor.id, "call.media", started["id"])
    assert (seen["user_id"], seen["audio"], seen["video"]) == (str(visit.patient.id), True, False)
    refused(await client.post(f"/api/v1/calls/{started['id']}/media", headers=visit.doctor.headers,
                              json={"audio": "off"}), 422)
    await act(client, visit.doctor, started["id"], "end")
    refused(await client.post(f"/api/v1/calls/{started['id']}/media", headers=visit.doctor.headers,
                              json={"audio": True, "video": True}), 409, "call_ended")


# --- the ring timeout ------------------------------------------------------------------------------


async def test_an_unanswered_call_is_missed_once_whichever_instance_expires_it(
    test_settings: Settings, visit: Visit, session_maker: Maker,
) -> None:
    quick = msgspec.structs.replace(test_settings, call_ring_seconds=1)
    async with running(quick) as one, running(quick) as two:
        started = await start(one, visit)
        two.app.state.call_keeper.wake()  # the other instance knows the deadline too: both expire it at once

        async def missed() -> bool:
            answer = await two.get(f"/api/v1/calls/{started['id']}", headers=visit.patient.headers)
            return bool(answer.json()["state"] == "ended")

        await eventually(missed, "the call was not ended after its ring time")
        got = (await one.get(f"/api/v1/calls/{started['id']}", headers=visit.doctor.headers)).json()
        assert got["end_reason"] == "missed"
        refused(await act(two, visit.patient, started["id"], "accept"), 409, "call_not_ringing")
    async with session_maker() as session:
        texts = (await session.scalars(select(Message.text).where(
            Message.conversation_id == UUID(visit.conversation_id), Message.kind == "system"))).all()
        notices = await session.scalar(select(func.count()).select_from(OutboxEvent).where(
            OutboxEvent.type == "notice", OutboxEvent.aggregate_id == UUID(started["id"])))
    assert list(texts).count(MISSED_TEXT) == 1  # the chat shows it once
    assert notices == 1
    for who in (visit.patient.id, visit.doctor.id):
        [ended] = await events(session_maker, who, "call.ended", started["id"])
        assert ended["end_reason"] == "missed"
    [notice] = await events(session_maker, visit.patient.id, "notice", started["id"])
    assert notice["kind"] == "missed_call"
    assert await events(session_maker, visit.doctor.id, "notice", started["id"]) == []


# --- SFU nodes that die --------------------------------------------------------------------------


async def test_a_call_whose_sfu_node_is_gone_ends_failed(
    test_settings: Settings, client: AsyncTestClient[Any], visit: Visit, session_maker: Maker,
) -> None:
    """A call's room on a node no longer alive (listed in SFU_URLS, registered nowhere, not answering its address)
    ends `failed` on both sides; the node checks of an instance that starts find it."""
    started = await start(client, visit)
    assert (await act(client, visit.patient, started["id"], "accept")).status_code == 200
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    async with session_maker() as session:
        await session.execute(update(Call).where(Call.id == UUID(started["id"])).values(node=f"{dead}#3fa2c1d0"))
        await session.commit()
    watching = msgspec.structs.replace(test_settings, sfu_urls=dead, sfu_secret="s" * 32, sfu_heartbeat_seconds=0.2,
                                       sfu_timeout_seconds=1.0, call_node_check_seconds=0.2)
    async with running(watching) as restarted:
        async def failed() -> bool:
            answer = await restarted.get(f"/api/v1/calls/{started['id']}", headers=visit.doctor.headers)
            return bool(answer.json()["state"] == "ended")

        await eventually(failed, "the call of a dead node did not end")
    got = (await client.get(f"/api/v1/calls/{started['id']}", headers=visit.patient.headers)).json()
    assert got["end_reason"] == "failed"
    for who in (visit.patient.id, visit.doctor.id):
        [ended] = await events(session_maker, who, "call.ended", started["id"])
        assert ended["end_reason"] == "failed"
    second = await start(client, visit)  # the consultation may be called again
    assert second["state"] == "ringing"


# --- media: offers answered by the SFU ---------------------------------------------------------------


async def offer_sdp() -> str:
    """What a call client offers: one audio and one video transceiver, sendrecv (as API.md asks)."""
    from aiortc import RTCPeerConnection

    pc = RTCPeerConnection()
    try:
        pc.addTransceiver("audio", direction="sendrecv")
        pc.addTransceiver("video", direction="sendrecv")
        await pc.setLocalDescription(await pc.createOffer())
        return str(pc.localDescription.sdp)
    finally:
        await pc.close()


async def test_an_offer_is_answered_by_the_sfu_for_the_participants_only(
    client: AsyncTestClient[Any], visit: Visit, login: Callable[[str], Any], new_phone: Callable[[], str],
) -> None:
    started = await start(client, visit)
    url = f"/api/v1/calls/{started['id']}/rtc/offer"
    sdp = await offer_sdp()
    answered = await client.post(url, headers=visit.doctor.headers, json={"sdp": sdp, "type": "offer"})
    assert answered.status_code == 200, answered.text  # the doctor offers while it rings
    body = answered.json()
    assert body["type"] == "answer"
    assert "m=audio" in body["sdp"]
    assert "m=video" in body["sdp"]
    assert "a=sendrecv" in body["sdp"]
    stranger = await login(new_phone())
    refused(await client.post(url, headers=stranger.headers, json={"sdp": sdp, "type": "offer"}), 404)
    refused(await client.post(url, headers=visit.doctor.headers, json={"sdp": sdp, "type": "answer"}), 422)
    assert (await act(client, visit.patient, started["id"], "accept")).status_code == 200
    async with sockets_at(client) as base, websockets.connect(ws_url(base, visit.patient)) as socket:
        await nothing_pending(socket)
        await socket.send(json.dumps({"type": "rtc.candidate", "data": {"call_id": started["id"],
                                                                        "candidate": "candidate:1 1 udp 1 x 9 typ"}}))
        assert await nothing_pending(socket) == []  # no connection of its own yet: nothing to check, no error
        await socket.send(json.dumps({"type": "rtc.offer", "data": {"call_id": started["id"], "sdp": await offer_sdp(),
                                                                    "type": "offer"}}))
        answer = (await frames_until(socket, lambda f: f["type"] in ("rtc.answer", "error")))[-1]
        assert answer["type"] == "rtc.answer", answer
        assert answer["data"]["call_id"] == started["id"]
        assert answer["data"]["type"] == "answer"
        assert "m=video" in answer["data"]["sdp"]
        await socket.send(json.dumps({"type": "rtc.offer", "data": {"call_id": secrets.token_hex(4), "sdp": "x"}}))
        error = (await frames_until(socket, lambda f: f["type"] == "error"))[-1]
        assert error["data"]["reason"] == "invalid_offer"
    assert (await act(client, visit.doctor, started["id"], "end")).status_code == 200
    refused(await client.post(url, headers=visit.doctor.headers, json={"sdp": sdp, "type": "offer"}), 409,
            "call_ended")
