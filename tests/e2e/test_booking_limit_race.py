"""Parallel bookings of one patient, each at its own time, over real HTTP to a real server process: the live
bookings limit holds (it is counted after the slot is claimed, when SQLite's one writer orders the racers)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from litestar.testing import AsyncTestClient

from app.settings import Settings
from tests.conftest import Session
from tests.e2e.test_booking_races import RACERS, race, refusal
from tests.integration.conftest import free_slots


async def test_parallel_bookings_cannot_pass_the_live_bookings_limit(
    api: list[str], client: AsyncTestClient[Any], test_settings: Settings, specialist: Callable[..., Any],
    service: Callable[..., Any], patient: Session,
) -> None:
    limit = test_settings.live_bookings_per_patient
    doctor, visit_type = await specialist(days=3), await service()
    slots = (await free_slots(client, patient, doctor.id))[2:2 + limit + RACERS - 1]  # apart: never patient_busy

    def booking(slot: Any) -> tuple[str, dict[str, Any]]:
        return "/api/v1/consultations", {"slot_id": slot["id"], "service_id": visit_type["id"], "format": "in_person"}

    for slot in slots[:limit - 1]:
        path, body = booking(slot)
        answer = await client.post(path, headers=patient.headers, json=body)
        assert answer.status_code == 201, answer.text
    answers = await race(api, patient, [booking(s) for s in slots[limit - 1:]])
    statuses = [a.status_code for a in answers]
    assert statuses.count(201) == 1, [a.text for a in answers]
    assert {(a.status_code, refusal(a)) for a in answers if a.status_code != 201} == {(409, "too_many_bookings")}
    listed = (await client.get("/api/v1/consultations", headers=patient.headers, params={"limit": 100})).json()
    assert len(listed["items"]) == limit
    free = {s["id"] for s in await free_slots(client, patient, doctor.id)}
    taken = {s["id"] for s in slots[limit - 1:]} - free
    assert len(taken) == 1  # the refused claims were taken back
    assert taken <= {v["slot_id"] for v in listed["items"]}
