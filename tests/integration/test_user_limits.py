"""Per-user counts have limits a clinic never reaches and a script always does; beyond them a 409 names why.

Each runs against a second app on the same database with small limits, so a test needs only a few rows."""

from __future__ import annotations

import datetime as dt
from collections.abc import AsyncIterator, Callable
from typing import Any
from uuid import UUID

import msgspec
import pytest
from litestar.testing import AsyncTestClient
from sqlalchemy import select

from app.accounts.models import Device
from app.consultations.models import Consultation
from app.scheduling.models import Slot
from app.settings import Settings
from tests.conftest import Session, refused, running
from tests.integration.conftest import free_slots

LIMIT = 3


@pytest.fixture
async def limited(test_settings: Settings) -> AsyncIterator[AsyncTestClient[Any]]:
    small = msgspec.structs.replace(test_settings, dependents_per_guardian=LIMIT, devices_per_user=LIMIT,
                                    live_bookings_per_patient=LIMIT, waitlist_per_patient=LIMIT)
    async with running(small) as client:
        yield client


async def test_dependents_per_guardian(limited: AsyncTestClient[Any], patient: Session) -> None:
    for i in range(LIMIT):
        answer = await limited.post("/api/v1/me/dependents", headers=patient.headers, json={
            "full_name": f"Child {i}", "birth_date": "2015-05-01", "relation": "child",
            "legal_basis": "birth certificate"})
        assert answer.status_code == 201, answer.text
    refused(await limited.post("/api/v1/me/dependents", headers=patient.headers, json={
        "full_name": "One more", "birth_date": "2015-05-01", "relation": "child", "legal_basis": "birth certificate"}),
        409, "too_many_dependents")


async def test_devices_beyond_the_limit_replace_the_oldest(limited: AsyncTestClient[Any], patient: Session,
                                                           session_maker: Any) -> None:
    ids = []
    for i in range(LIMIT + 2):
        answer = await limited.post("/api/v1/devices", headers=patient.headers,
                                    json={"platform": "android", "push_token": f"limit-{patient.id}-{i}"})
        assert answer.status_code == 201, answer.text
        ids.append(answer.json()["id"])
    again = await limited.post("/api/v1/devices", headers=patient.headers,  # the third registers again: newest
                               json={"platform": "android", "push_token": f"limit-{patient.id}-2"})
    assert again.json()["id"] == ids[2]
    extra = await limited.post("/api/v1/devices", headers=patient.headers,
                               json={"platform": "ios", "push_token": f"limit-{patient.id}-new"})
    async with session_maker() as session:
        kept = set(map(str, await session.scalars(select(Device.id).where(Device.user_id == patient.id))))
    assert kept == {ids[2], ids[4], extra.json()["id"]}  # the least recently registered went


async def test_live_bookings_per_patient(limited: AsyncTestClient[Any], client: AsyncTestClient[Any],
                                         patient: Session, specialist: Callable[..., Any],
                                         service: Callable[..., Any], staff: Callable[..., Any]) -> None:
    doctor, visit_type = await specialist(days=3), await service()
    slots = await free_slots(client, patient, doctor.id)
    booked = []
    for slot in slots[2:2 + LIMIT]:  # well ahead: none begins while the test runs
        answer = await limited.post("/api/v1/consultations", headers=patient.headers, json={
            "slot_id": slot["id"], "service_id": visit_type["id"], "format": "in_person"})
        assert answer.status_code == 201, answer.text
        booked.append(answer.json())
    over = await limited.post("/api/v1/consultations", headers=patient.headers, json={
        "slot_id": slots[2 + LIMIT]["id"], "service_id": visit_type["id"], "format": "in_person"})
    refused(over, 409, "too_many_bookings")
    assert over.json()["extra"]["limit"] == LIMIT
    cancelled = await limited.post(f"/api/v1/consultations/{booked[0]['id']}/cancel", headers=patient.headers)
    assert cancelled.status_code == 200, cancelled.text  # a cancelled visit no longer counts
    again = await limited.post("/api/v1/consultations", headers=patient.headers, json={
        "slot_id": slots[2 + LIMIT]["id"], "service_id": visit_type["id"], "format": "in_person"})
    assert again.status_code == 201, again.text
    assert dt.datetime.fromisoformat(again.json()["starts_at"]) > dt.datetime.now(dt.UTC)


async def test_open_waitlist_requests_per_patient(limited: AsyncTestClient[Any], patient: Session) -> None:
    for _ in range(LIMIT):
        answer = await limited.post("/api/v1/waitlist", headers=patient.headers, json={"specialty": "massage"})
        assert answer.status_code == 201, answer.text
    refused(await limited.post("/api/v1/waitlist", headers=patient.headers, json={"specialty": "massage"}),
            409, "too_many_waitlist_requests")


async def test_a_booking_refused_over_the_limit_leaves_its_slot_free(
    limited: AsyncTestClient[Any], client: AsyncTestClient[Any], patient: Session, specialist: Callable[..., Any],
    service: Callable[..., Any], session_maker: Any,
) -> None:
    """The limit is counted after the slot is claimed (parallel bookings: tests/e2e/test_booking_limit_race.py);
    the refusal takes the claim back with it."""
    doctor, visit_type = await specialist(days=3), await service()
    slots = (await free_slots(client, patient, doctor.id))[2:3 + LIMIT]
    answers = [await limited.post("/api/v1/consultations", headers=patient.headers, json={
        "slot_id": s["id"], "service_id": visit_type["id"], "format": "in_person"}) for s in slots]
    assert [a.status_code for a in answers] == [201] * LIMIT + [409]
    refused(answers[-1], 409, "too_many_bookings")
    assert slots[-1]["id"] in {s["id"] for s in await free_slots(client, patient, doctor.id)}
    async with session_maker() as session:
        held = await session.scalar(select(Slot.consultation_id).where(Slot.id == UUID(slots[-1]["id"])))
        visits = (await session.scalars(select(Consultation.id).where(Consultation.patient_id == patient.id))).all()
    assert held is None
    assert len(visits) == LIMIT
