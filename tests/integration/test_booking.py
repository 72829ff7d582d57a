"""Booking: exactly one winner, holds, the clinic's rules, booking by the front desk."""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Callable
from typing import Any

import msgspec
from litestar.testing import AsyncTestClient
from sqlalchemy import func, select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.consultations.models import Consultation
from app.scheduling.models import Slot
from app.settings import Settings
from tests.conftest import Session, running
from tests.integration.conftest import free_slots


async def test_fifty_racers_one_winner(
    client: AsyncTestClient[Any], specialist: Callable[..., Any], service: Callable[..., Any],
    login: Callable[[str], Any], new_phone: Callable[[], str], session_maker: async_sessionmaker[AsyncSession],
) -> None:
    doctor, visit_type = await specialist(), await service()
    racers = [await login(new_phone()) for _ in range(50)]
    slot = (await free_slots(client, racers[0], doctor.id))[0]

    async def race(who: Session) -> int:
        answer = await client.post("/api/v1/consultations", headers=who.headers, json={
            "slot_id": slot["id"], "service_id": visit_type["id"], "format": "in_person"})
        if answer.status_code == 409:
            assert answer.json()["extra"]["reason"] == "slot_taken"
        return answer.status_code

    statuses = await asyncio.gather(*(race(r) for r in racers))
    assert sorted(statuses).count(201) == 1
    assert statuses.count(409) == 49
    async with session_maker() as session:
        booked = await session.scalar(select(func.count()).select_from(Consultation)
                                      .where(Consultation.slot_id == slot["id"]))
    assert booked == 1
    assert slot["id"] not in [s["id"] for s in await free_slots(client, racers[0], doctor.id)]


async def test_a_hold_keeps_others_out_until_it_expires(
    client: AsyncTestClient[Any], specialist: Callable[..., Any], service: Callable[..., Any],
    login: Callable[[str], Any], new_phone: Callable[[], str], session_maker: async_sessionmaker[AsyncSession],
) -> None:
    doctor, visit_type = await specialist(), await service()
    holder, other = await login(new_phone()), await login(new_phone())
    slot = (await free_slots(client, holder, doctor.id))[0]
    held = await client.post(f"/api/v1/slots/{slot['id']}/hold", headers=holder.headers)
    assert held.status_code == 201
    hold = held.json()
    assert slot["id"] not in [s["id"] for s in await free_slots(client, other, doctor.id)]  # seen as taken
    assert (await client.post(f"/api/v1/slots/{slot['id']}/hold", headers=other.headers)).status_code == 409
    body = {"slot_id": slot["id"], "service_id": visit_type["id"], "format": "in_person"}
    stolen = await client.post("/api/v1/consultations", headers=other.headers,
                               json={**body, "hold_id": hold["hold_id"]})
    assert stolen.status_code == 409  # a hold id is no use to anyone but its holder
    assert (await client.post("/api/v1/consultations", headers=other.headers, json=body)).status_code == 409
    async with session_maker() as session:  # the few minutes pass
        await session.execute(update(Slot).where(Slot.id == slot["id"])
                              .values(held_until=dt.datetime.now(dt.UTC) - dt.timedelta(seconds=1)))
        await session.commit()
    assert slot["id"] in [s["id"] for s in await free_slots(client, other, doctor.id)]
    late = await client.post("/api/v1/consultations", headers=other.headers, json=body)
    assert late.status_code == 201


async def test_booking_with_the_hold_converts_it(
    client: AsyncTestClient[Any], specialist: Callable[..., Any], service: Callable[..., Any], patient: Session,
) -> None:
    doctor, visit_type = await specialist(), await service()
    slot = (await free_slots(client, patient, doctor.id))[0]
    hold = (await client.post(f"/api/v1/slots/{slot['id']}/hold", headers=patient.headers)).json()
    booked = await client.post("/api/v1/consultations", headers=patient.headers, json={
        "slot_id": slot["id"], "service_id": visit_type["id"], "format": "in_person", "hold_id": hold["hold_id"]})
    assert booked.status_code == 201, booked.text
    visit = booked.json()
    assert visit["status"] == "pending_confirmation"  # a first-time patient waits for the call centre
    assert (visit["slot_id"], visit["starts_at"]) == (slot["id"], slot["starts_at"])  # both in the caller's zone
    assert visit["paid"] is False
    assert visit["conversation_id"] is not None  # one conversation per patient and specialist


async def test_online_needs_a_completed_in_person_visit_first(
    specialist: Callable[..., Any], service: Callable[..., Any], patient: Session,
    book: Callable[..., Any], visit_until: Callable[..., Any],
) -> None:
    doctor, visit_type = await specialist(), await service()
    refused = await book(patient, doctor, visit_type, fmt="online")
    assert refused.status_code == 422
    assert refused.json()["extra"]["reason"] == "first_visit_in_person"
    await visit_until(patient, doctor, visit_type, "completed")
    online = await book(patient, doctor, visit_type, fmt="online", nth=1)
    assert online.status_code == 201, online.text
    assert online.json()["status"] == "confirmed"  # no longer a first-time patient


async def test_in_person_only_services_are_never_online(
    specialist: Callable[..., Any], service: Callable[..., Any], patient: Session,
    book: Callable[..., Any], visit_until: Callable[..., Any],
) -> None:
    sonographer = await specialist("sonographer", ["ultrasound"])
    ultrasound = await service("ultrasound", in_person_only=True, stage="single")
    await visit_until(patient, sonographer, ultrasound, "completed")
    refused = await book(patient, sonographer, ultrasound, fmt="online", nth=1)
    assert refused.status_code == 422
    assert refused.json()["extra"]["reason"] == "service_in_person_only"


async def test_a_service_of_another_direction_is_refused(
    specialist: Callable[..., Any], service: Callable[..., Any], patient: Session, book: Callable[..., Any],
) -> None:
    doctor, massage = await specialist(), await service("massage", in_person_only=True)
    refused = await book(patient, doctor, massage)
    assert refused.status_code == 422
    assert refused.json()["extra"]["reason"] == "service_not_offered"


async def test_unknown_ids_and_bad_formats(
    client: AsyncTestClient[Any], specialist: Callable[..., Any], service: Callable[..., Any], patient: Session,
) -> None:
    doctor, visit_type = await specialist(), await service()
    slot = (await free_slots(client, patient, doctor.id))[0]
    zero = "00000000-0000-0000-0000-000000000000"
    cases = [({"slot_id": zero, "service_id": visit_type["id"], "format": "in_person"}, 404),
             ({"slot_id": slot["id"], "service_id": zero, "format": "in_person"}, 422),
             ({"slot_id": slot["id"], "service_id": visit_type["id"], "format": "video"}, 422),
             ({"slot_id": "x", "service_id": visit_type["id"], "format": "in_person"}, 422)]
    for body, status in cases:
        assert (await client.post("/api/v1/consultations", headers=patient.headers, json=body)).status_code == status
    assert slot["id"] in [s["id"] for s in await free_slots(client, patient, doctor.id)]  # nothing half-written


async def test_a_guardian_books_for_their_dependent_only(
    client: AsyncTestClient[Any], specialist: Callable[..., Any], service: Callable[..., Any], patient: Session,
    book: Callable[..., Any], login: Callable[[str], Any], new_phone: Callable[[], str],
) -> None:
    doctor, visit_type = await specialist("doctor", ["pediatrics"]), await service("pediatrics")
    child = (await client.post("/api/v1/me/dependents", headers=patient.headers, json={
        "full_name": "Kid Testov", "birth_date": "2020-01-01", "relation": "child",
        "legal_basis": "birth certificate"})).json()
    mine = await book(patient, doctor, visit_type, patient_id=child["id"])
    assert mine.status_code == 201
    assert mine.json()["patient_id"] == child["id"]
    stranger = await login(new_phone())
    theirs = await book(stranger, doctor, visit_type, nth=1, patient_id=child["id"])
    assert theirs.status_code == 404
    listed = (await client.get("/api/v1/consultations", headers=patient.headers)).json()["items"]
    assert [c["id"] for c in listed] == [mine.json()["id"]]


async def test_the_front_desk_books_by_phone_without_duplicate_cards(
    client: AsyncTestClient[Any], specialist: Callable[..., Any], service: Callable[..., Any], patient: Session,
    staff: Callable[..., Any], book: Callable[..., Any], new_phone: Callable[[], str],
) -> None:
    doctor, visit_type = await specialist(), await service()
    registrar = await staff("registrar")
    written = "8 " + patient.phone[2:5] + " " + patient.phone[5:]  # the caller dictates it the national way
    known = await book(registrar, doctor, visit_type, patient_phone=written)
    assert known.status_code == 201, known.text
    assert known.json()["patient_id"] == str(patient.id)
    assert known.json()["status"] == "confirmed"  # the call centre itself booked it
    newcomer = new_phone()
    fresh = await book(registrar, doctor, visit_type, nth=1, patient_phone=newcomer, patient_name="New Caller")
    again = await book(registrar, doctor, visit_type, nth=2, patient_phone=newcomer)
    assert fresh.json()["patient_id"] == again.json()["patient_id"]
    child = (await client.post("/api/v1/me/dependents", headers=patient.headers, json={
        "full_name": "Lena Testova", "birth_date": "2015-05-05", "relation": "child",
        "legal_basis": "birth certificate"})).json()
    for_child = await book(registrar, doctor, visit_type, nth=3, patient_phone=patient.phone,
                           dependent_name="lena  TESTOVA")
    assert for_child.json()["patient_id"] == child["id"]
    missing = await book(registrar, doctor, visit_type, nth=4, patient_phone=patient.phone, dependent_name="Nobody")
    assert missing.status_code == 404
    nobody = await book(registrar, doctor, visit_type, nth=4)
    assert nobody.json()["extra"]["reason"] == "patient_required"


async def test_staff_roles_that_do_not_book_are_refused(
    specialist: Callable[..., Any], service: Callable[..., Any],
    staff: Callable[..., Any], book: Callable[..., Any],
) -> None:
    doctor, visit_type = await specialist(), await service()
    for role, specialties in (("methodist", []), ("psychologist", ["psychology"])):
        member = await staff(role, specialties)
        assert (await book(member, doctor, visit_type)).status_code == 403


async def test_the_race_holds_on_the_embedded_profile_too(
    test_settings: Settings, specialist: Callable[..., Any], service: Callable[..., Any],
    login: Callable[[str], Any], new_phone: Callable[[], str], client: AsyncTestClient[Any],
) -> None:
    doctor, visit_type = await specialist(), await service()
    racers = [await login(new_phone()) for _ in range(10)]
    slot = (await free_slots(client, racers[0], doctor.id))[0]
    async with running(msgspec.structs.replace(test_settings)) as second:  # a second app on the same database
        answers = await asyncio.gather(*(
            (client if i % 2 else second).post("/api/v1/consultations", headers=r.headers, json={
                "slot_id": slot["id"], "service_id": visit_type["id"], "format": "in_person"})
            for i, r in enumerate(racers)))
    statuses = sorted(a.status_code for a in answers)
    assert statuses.count(201) == 1
    assert all(s == 409 for s in statuses if s != 201), [a.text for a in answers if a.status_code not in (201, 409)]
