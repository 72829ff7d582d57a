"""Races of one patient against themselves, over real HTTP to real server processes (true parallel requests):
parallel bookings at one time let one through, parallel holds stop at the limit."""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Callable
from typing import Any

import httpx
from litestar.testing import AsyncTestClient

from app.settings import Settings
from tests.conftest import Session
from tests.integration.conftest import free_slots

RACERS = 16


async def race(api: list[str], who: Session, requests: list[tuple[str, dict[str, Any] | None]]) -> list[Any]:
    """Send every request at once, each on its own connection."""
    clients = [httpx.AsyncClient(base_url=base, headers=who.headers, limits=httpx.Limits(max_connections=RACERS))
               for base in api]
    try:  # open every connection first, so the racers leave together
        await asyncio.gather(*(clients[i % len(clients)].get("/health/ready") for i in range(len(requests))))
        return list(await asyncio.gather(*(clients[i % len(clients)].post(path, json=body)
                                           for i, (path, body) in enumerate(requests))))
    finally:
        for c in clients:
            await c.aclose()


def refusal(answer: httpx.Response) -> str:
    body = answer.json()
    assert set(body) == {"status_code", "detail", "extra"}, body
    return str(body["extra"].get("reason"))


async def test_parallel_bookings_of_one_patient_at_one_time_let_one_through(
    api: list[str], client: AsyncTestClient[Any], specialist: Callable[..., Any], service: Callable[..., Any],
    patient: Session,
) -> None:
    doctors = [await specialist() for _ in range(RACERS)]
    visit_type = await service()
    starts_at = dt.datetime.fromisoformat((await free_slots(client, patient, doctors[0].id))[2]["starts_at"])
    slots = [next(s for s in await free_slots(client, patient, d.id)
                  if dt.datetime.fromisoformat(s["starts_at"]) == starts_at) for d in doctors]
    answers = await race(api, patient, [("/api/v1/consultations", {
        "slot_id": s["id"], "service_id": visit_type["id"], "format": "in_person"}) for s in slots])
    statuses = [a.status_code for a in answers]
    assert statuses.count(201) == 1, [a.text for a in answers]
    assert {(a.status_code, refusal(a)) for a in answers if a.status_code != 201} == {(409, "patient_busy")}
    listed = (await client.get("/api/v1/consultations", headers=patient.headers)).json()["items"]
    assert len(listed) == 1


async def test_parallel_holds_cannot_pass_the_limit(
    api: list[str], client: AsyncTestClient[Any], test_settings: Settings, specialist: Callable[..., Any],
    patient: Session,
) -> None:
    therapist = await specialist("massage_therapist", ["massage"])
    slots = (await free_slots(client, patient, therapist.id))[1:1 + RACERS]
    answers = await race(api, patient, [(f"/api/v1/slots/{s['id']}/hold", None) for s in slots])
    statuses = [a.status_code for a in answers]
    assert statuses.count(201) == test_settings.holds_per_patient, [a.text for a in answers]
    assert {(a.status_code, refusal(a)) for a in answers if a.status_code != 201} == {(409, "too_many_holds")}
