"""A clinic's day across processes: two API instances, an outbox worker and an SFU node, as plain processes on
loopback against one PostgreSQL, Redis and SeaweedFS. A patient and a doctor go through booking, a chat with an
attachment and a call, and every step crosses instances: what one instance changes, the other's sockets hear, and
the worker (a process of its own) pushes to the patient's phone while their app is closed.

Real profile only in its full form; the embedded profile (one process, SQLite) walks the same steps through one
API process, whose own worker sends the pushes."""

from __future__ import annotations

import asyncio
import json
import secrets
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest
import websockets

from app.__main__ import create_admin
from app.rtc.sfu.ice import loopback_candidates
from app.settings import Settings
from tests.conftest import PROFILE, Session, migrated_database_url
from tests.e2e.browser import Peer
from tests.e2e.conftest import servers
from tests.e2e.test_calls_multiprocess import WAIT, call_event, frames, offer_through
from tests.e2e.test_gateway import frames_until, nothing_pending, ws_url
from tests.e2e.test_worker_process import worker_process
from tests.integration.conftest import ALL_WEEK
from tests.sfu_nodes import SECRET, node_process
from tests.standins.fixtures import FcmFixture

REAL = PROFILE == "real"
PDF = b"%PDF-1.4\n1 0 obj\n<< /Type /Catalog >>\nendobj\ntrailer\n<< /Root 1 0 R >>\n%%EOF\n"
_phones = iter(range(10_000_000))


def new_phone() -> str:
    return f"+7917{secrets.randbelow(900) + 100}{next(_phones):04d}"


@pytest.fixture
async def own_world(test_settings: Settings, tmp_path: Path) -> Settings:
    """A database and data directory of this test's own: no in-process worker of the suite shares its outbox."""
    url = await migrated_database_url(tmp_path, "walk")
    return msgspec.structs.replace(test_settings, database_url=url, data_dir=str(tmp_path),
                                   sms_log_path=str(tmp_path / "sms.log"))


async def code_for(settings: Settings, phone: str) -> str:
    """The one-time code the server wrote to the SMS log (its writer batches: wait for the line)."""
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        path = Path(settings.resolved_sms_log_path)
        for line in reversed(path.read_text().splitlines() if path.exists() else []):
            entry = json.loads(line)
            if entry["to"] == phone and "code: " in entry["text"]:
                return str(entry["text"].split("code: ")[1][:6])
        await asyncio.sleep(0.05)
    raise AssertionError(f"no code reached {phone}")


async def sign_in(http: httpx.AsyncClient, settings: Settings, phone: str) -> Session:
    assert (await http.post("/api/v1/auth/otp", json={"phone": phone})).status_code == 202
    answer = await http.post("/api/v1/auth/token", json={"phone": phone, "code": await code_for(settings, phone)})
    assert answer.status_code == 200, answer.text
    body = answer.json()
    return Session(id=uuid.UUID(body["user"]["id"]), phone=phone, access=body["access_token"],
                   refresh=body["refresh_token"])


async def ok(answer: Any, status: int = 200) -> Any:
    response = await answer
    assert response.status_code == status, response.text
    return response.json() if response.content else None


@asynccontextmanager
async def processes(settings: Settings, fcm: FcmFixture) -> AsyncIterator[tuple[str, str, str]]:
    """The SFU node, the API instances (two on the real profile) and the worker; yields (node, api A, api B)."""
    async with AsyncExitStack() as stack:
        node = await stack.enter_async_context(node_process(settings))
        common = {"SFU_URLS": node.url, "SFU_SECRET": SECRET, **fcm.env(), "OUTBOX_POLL_SECONDS": "0.2",
                  "START_EARLY_MINUTES": str(settings.start_early_minutes)}  # visits booked ahead start now
        if REAL:  # the pushes are the worker process's alone
            urls = await stack.enter_async_context(servers(settings, 2, OUTBOX_WORKER_IN_API="false", **common))
            await stack.enter_async_context(worker_process(settings, fcm))
        else:  # SQLite: the API process's own worker sends
            urls = await stack.enter_async_context(servers(settings, 1, **common))
        yield node.url, urls[0], urls[-1]


async def test_booking_a_chat_with_an_attachment_and_a_call_cross_instances_at_every_step(
    own_world: Settings, fcm_standin: FcmFixture,
) -> None:
    settings = own_world
    admin_phone = new_phone()
    await asyncio.to_thread(create_admin, settings, admin_phone, "Walk Admin")
    async with processes(settings, fcm_standin) as (node_url, base_a, base_b), \
            httpx.AsyncClient(base_url=base_a, timeout=WAIT) as a, \
            httpx.AsyncClient(base_url=base_b, timeout=WAIT) as b:
        # --- the clinic, arranged through instance A -------------------------------------------------------
        admin = await sign_in(a, settings, admin_phone)
        people: dict[str, Session] = {}
        for role, specialties in (("doctor", ["endocrinology"]), ("registrar", [])):
            phone = new_phone()
            await ok(a.post("/api/v1/staff", headers=admin.headers, json={
                "phone": phone, "full_name": f"Walk {role}", "role": role, "specialties": specialties}), 201)
            people[role] = await sign_in(b if role == "doctor" else a, settings, phone)
        doctor, registrar = people["doctor"], people["registrar"]
        await ok(a.put(f"/api/v1/specialists/{doctor.id}/schedule", headers=admin.headers, json={
            "timezone": "Europe/Moscow", "slot_minutes": 30, "horizon_days": 2, "weekly": ALL_WEEK}))
        visit_type = await ok(a.post("/api/v1/services", headers=admin.headers, json={
            "specialty": "endocrinology", "title": "endocrinology visit", "duration_minutes": 30,
            "price": "3000.00", "in_person_only": False, "stage": "first"}), 201)
        patient = await sign_in(a, settings, new_phone())
        android = f"fcm-{secrets.token_hex(16)}"
        await ok(a.post("/api/v1/devices", headers=patient.headers, json={"platform": "android",
                                                                            "push_token": android}), 201)

        async def book(nth: int, fmt: str) -> dict[str, Any]:
            """The patient books on A; a first visit is confirmed by the registrar on B."""
            slots = (await ok(a.get(f"/api/v1/specialists/{doctor.id}/slots", headers=patient.headers)))["items"]
            visit = await ok(a.post("/api/v1/consultations", headers=patient.headers, json={
                "slot_id": slots[nth]["id"], "service_id": visit_type["id"], "format": fmt}), 201)
            if visit["status"] == "pending_confirmation":
                visit = await ok(b.post(f"/api/v1/consultations/{visit['id']}/confirm", headers=registrar.headers))
            assert visit["status"] == "confirmed"
            return dict(visit)

        # an online visit follows an in-person one: that one is done first (started and completed on B)
        first = await book(1, "in_person")
        for command in ("start", "complete"):
            await ok(b.post(f"/api/v1/consultations/{first['id']}/{command}", headers=doctor.headers))

        with loopback_candidates():
            doctor_peer, patient_peer = Peer(), Peer()
            try:
                async with websockets.connect(ws_url(base_a, patient)) as patient_ws, \
                        websockets.connect(ws_url(base_b, doctor)) as doctor_ws:
                    await nothing_pending(patient_ws)
                    await nothing_pending(doctor_ws)
                    # --- booking: made on A, heard by the doctor's socket on B ------------------------------
                    visit = await book(3, "online")
                    await frames_until(doctor_ws, lambda f: f["type"] == "consultation.updated"
                                       and f["data"]["consultation_id"] == visit["id"]
                                       and f["data"]["change"] == "booked")
                    conversation = visit["conversation_id"]

                    # --- chat with an attachment: uploaded and sent on A, heard and downloaded on B --------
                    document = await ok(a.post("/api/v1/documents/upload", headers=patient.headers,
                                               data={"patient_id": str(patient.id), "kind": "analysis"},
                                               files={"file": ("analysis.pdf", PDF, "application/pdf")}), 201)
                    assert document["status"] == "ready"
                    sent = await ok(a.post(f"/api/v1/chats/{conversation}/messages", headers=patient.headers, json={
                        "client_id": uuid.uuid4().hex, "text": "the results", "document_ids": [document["id"]]}),
                        201)
                    heard = (await frames_until(doctor_ws, lambda f: f["type"] == "message.new"
                                                and f["data"].get("id") == sent["id"]))[-1]["data"]
                    assert [d["id"] for d in heard["documents"]] == [document["id"]]
                    link = await b.get(f"/api/v1/documents/{document['id']}/download", headers=doctor.headers)
                    assert link.status_code == 307, link.text
                    async with httpx.AsyncClient(timeout=WAIT) as storage:
                        assert (await storage.get(link.headers["location"])).content == PDF

                    # --- the patient's app closes: the doctor's reply on B reaches the phone by push ---------
                    await patient_ws.close()
                    await asyncio.sleep(0.5)  # the instance forgets the socket's presence
                    reply = await ok(b.post(f"/api/v1/chats/{conversation}/messages", headers=doctor.headers, json={
                        "client_id": uuid.uuid4().hex, "text": "thank you, seen"}), 201)
                    deadline = time.monotonic() + WAIT
                    while not any(r.token == android and r.message["data"].get("ref") == reply["id"]
                                  for r in fcm_standin.requests):
                        assert time.monotonic() < deadline, "no push of the reply reached the patient's phone"
                        await asyncio.sleep(0.05)

                    # --- the call: started on B, rung and answered on A, media through the SFU node --------
                    async with websockets.connect(ws_url(base_a, patient)) as patient_again:
                        await nothing_pending(patient_again)
                        started = await ok(b.post(f"/api/v1/consultations/{visit['id']}/calls",
                                                  headers=doctor.headers), 201)
                        call_id = started["id"]
                        assert (await call_event(patient_again, "call.incoming", call_id))["state"] == "ringing"
                        doctor_up, patient_up = doctor_peer.connected(), patient_peer.connected()
                        async with httpx.AsyncClient(base_url=base_b, headers=doctor.headers) as doctor_api, \
                                httpx.AsyncClient(base_url=base_a, headers=patient.headers) as patient_api:
                            await offer_through(doctor_api, call_id, doctor_peer)
                            await ok(patient_api.post(f"/api/v1/calls/{call_id}/accept"))
                            assert (await call_event(doctor_ws, "call.accepted", call_id))["state"] == "active"
                            await offer_through(patient_api, call_id, patient_peer)
                            await asyncio.wait_for(asyncio.gather(doctor_up, patient_up), WAIT)
                            for who, peer in (("doctor", doctor_peer), ("patient", patient_peer)):
                                for kind in ("video", "audio"):
                                    await frames(who, peer, kind)
                            async with httpx.AsyncClient(headers={"Authorization": f"Bearer {SECRET}"}) as control:
                                load = (await control.get(f"{node_url}/health")).json()
                            assert (load["rooms"], load["participants"]) == (1, 2)  # on the node process
                            await ok(patient_api.post(f"/api/v1/calls/{call_id}/end"))
                        for socket in (patient_again, doctor_ws):
                            ended = (await frames_until(socket, lambda f: f["type"] == "call.ended"
                                                        and f["data"]["call_id"] == call_id))[-1]["data"]
                            assert ended["end_reason"] == "completed"
            finally:
                await doctor_peer.close()
                await patient_peer.close()
