"""A slot opening reaches a waiting patient's open socket as a `notice`, with a real WebSocket client."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

import httpx
import websockets

from tests.conftest import Session

WAIT = 10.0  # seconds an expected frame may take before the test fails


async def test_a_cancelled_slot_reaches_the_waiting_patients_socket(
    api: list[str], specialist: Callable[..., Any], service: Callable[..., Any], patient: Session,
    login: Callable[[str], Any], new_phone: Callable[[], str], book: Callable[..., Any],
) -> None:
    doctor, visit_type = await specialist("doctor", ["urology"]), await service("urology")
    waiting: Session = await login(new_phone())
    visit = (await book(patient, doctor, visit_type, nth=1)).json()
    base = api[0]
    async with httpx.AsyncClient(base_url=base) as http:
        request = (await http.post("/api/v1/waitlist", headers=waiting.headers, json={
            "specialty": "urology", "specialist_id": str(doctor.id)})).json()
        url = base.replace("http://", "ws://") + f"/api/v1/ws?token={waiting.access}"
        async with websockets.connect(url) as socket:
            await socket.send(json.dumps({"type": "ping"}))  # the pong says the socket is registered
            while json.loads(await asyncio.wait_for(socket.recv(), WAIT))["type"] != "pong":
                pass
            cancelled = await http.post(f"/api/v1/consultations/{visit['id']}/cancel", headers=patient.headers,
                                        json={"reason": "feeling better"})
            assert cancelled.status_code == 200, cancelled.text
            while (frame := json.loads(await asyncio.wait_for(socket.recv(), WAIT)))["type"] != "notice":
                pass
    assert frame["data"]["kind"] == "waitlist_slot_available"
    assert (frame["data"]["waitlist_id"], frame["data"]["slot_id"]) == (request["id"], visit["slot_id"])
    assert frame["data"]["specialist_id"] == str(doctor.id)
