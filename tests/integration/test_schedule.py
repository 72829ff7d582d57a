"""Schedules, slots in the caller's zone, calendars, my-patients, the partner feed and the waitlist."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from typing import Any

from litestar.testing import AsyncTestClient
from sqlalchemy import delete, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.outbox import OutboxEvent
from app.scheduling.models import Slot
from app.scheduling.service import SchedulingService
from tests.conftest import Session
from tests.integration.conftest import ALL_WEEK, free_slots

MOSCOW_DAY = [{"weekday": d, "start": "09:00", "end": "18:00"} for d in range(7)]


async def set_schedule(client: AsyncTestClient[Any], who: Session, specialist_id: Any, **body: Any) -> Any:
    return await client.put(f"/api/v1/specialists/{specialist_id}/schedule", headers=who.headers, json={
        "timezone": "Europe/Moscow", "slot_minutes": 30, "horizon_days": 3, "weekly": MOSCOW_DAY, **body})


async def test_a_patient_far_east_sees_moscow_slots_in_their_own_time(
    client: AsyncTestClient[Any], admin: Session, staff: Callable[..., Any], patient: Session,
) -> None:
    doctor = await staff("doctor", ["gynecology"])
    assert (await set_schedule(client, admin, doctor.id)).status_code == 200
    await client.patch("/api/v1/me", headers=patient.headers, json={"timezone": "Asia/Vladivostok"})
    far_east = await free_slots(client, patient, doctor.id)
    in_moscow = await free_slots(client, patient, doctor.id, tz="Europe/Moscow")
    assert [s["id"] for s in far_east] == [s["id"] for s in in_moscow]
    for east, west in zip(far_east, in_moscow, strict=True):
        e, w = dt.datetime.fromisoformat(east["starts_at"]), dt.datetime.fromisoformat(west["starts_at"])
        assert e == w  # the same instant ...
        assert e.utcoffset() == dt.timedelta(hours=10)
        assert w.utcoffset() == dt.timedelta(hours=3)
        assert 9 <= w.hour < 18
        assert e.hour == (w.hour + 7) % 24
    in_berlin = await free_slots(client, patient, doctor.id, tz="Europe/Berlin")
    offsets = {dt.datetime.fromisoformat(s["starts_at"]).utcoffset() for s in in_berlin}
    assert offsets <= {dt.timedelta(hours=1), dt.timedelta(hours=2)}  # CET or CEST, as the date falls


async def test_a_day_range_is_read_in_the_callers_zone(
    client: AsyncTestClient[Any], admin: Session, staff: Callable[..., Any], patient: Session,
) -> None:
    doctor = await staff("doctor", ["urology"])
    await set_schedule(client, admin, doctor.id, weekly=ALL_WEEK, horizon_days=3)
    tomorrow = (dt.datetime.now(dt.UTC) + dt.timedelta(days=1)).astimezone(dt.timezone(dt.timedelta(hours=10)))
    day = tomorrow.date().isoformat()
    slots = await free_slots(client, patient, doctor.id, tz="Asia/Vladivostok", **{"from": day, "to": day})
    assert len(slots) == 48  # a whole local day of half-hour slots
    assert {s["starts_at"][:10] for s in slots} == {day}
    for bad in ({"from": "yesterday"}, {"tz": "Mars/Base"}, {"from": day, "to": "2000-01-01"},
                {"from": "2026-01-01", "to": "2027-01-01"}):
        answer = await client.get(f"/api/v1/specialists/{doctor.id}/slots", headers=patient.headers, params=bad)
        assert answer.status_code == 422, bad


async def test_changing_a_schedule_never_deletes_a_booked_slot(
    client: AsyncTestClient[Any], admin: Session, specialist: Callable[..., Any], service: Callable[..., Any],
    patient: Session, book: Callable[..., Any],
) -> None:
    doctor, visit_type = await specialist(days=2), await service()
    booked = (await book(patient, doctor, visit_type, nth=3)).json()
    changed = await set_schedule(client, admin, doctor.id, weekly=[], horizon_days=2)  # a week with no hours
    assert changed.status_code == 200
    assert changed.json()["slots_removed"] > 0
    assert await free_slots(client, patient, doctor.id) == []
    still = await client.get(f"/api/v1/consultations/{booked['id']}", headers=patient.headers)
    assert still.json()["status"] == "pending_confirmation"
    back = await set_schedule(client, admin, doctor.id, weekly=ALL_WEEK, horizon_days=2)
    assert back.json()["slots_created"] > 0
    starts = [s["starts_at"] for s in await free_slots(client, patient, doctor.id, tz="UTC")]
    assert dt.datetime.fromisoformat(booked["starts_at"]).isoformat() not in starts  # no double slot over it


async def test_schedules_are_set_by_admins_and_registrars_only(
    client: AsyncTestClient[Any], staff: Callable[..., Any], patient: Session,
) -> None:
    doctor = await staff("doctor", ["ent"])
    registrar = await staff("registrar")
    assert (await set_schedule(client, registrar, doctor.id)).status_code == 200
    for outsider in (patient, doctor):
        assert (await set_schedule(client, outsider, doctor.id)).status_code == 403
    methodist = await staff("methodist")
    assert (await set_schedule(client, registrar, methodist.id)).status_code == 404  # not a specialist
    for bad in ({"timezone": "Nowhere/City"}, {"slot_minutes": 3},
                {"weekly": [{"weekday": 7, "start": "09:00", "end": "10:00"}]},
                {"weekly": [{"weekday": 1, "start": "18:00", "end": "09:00"}]},
                {"weekly": [{"weekday": 1, "start": "9am", "end": "10:00"}]}):
        assert (await set_schedule(client, registrar, doctor.id, **bad)).status_code == 422, bad


async def test_catalogue_reads_for_everyone(client: AsyncTestClient[Any], specialist: Callable[..., Any],
                                            service: Callable[..., Any], patient: Session) -> None:
    specialties = (await client.get("/api/v1/specialties")).json()["items"]
    assert [s["code"] for s in specialties] == ["endocrinology", "gynecology", "urology", "ent", "pediatrics",
                                                "psychology", "ultrasound", "massage"]
    doctor, massage = await specialist("massage_therapist", ["massage"]), await service("massage", in_person_only=True)
    listed = (await client.get("/api/v1/services", params={"specialty": "massage"})).json()["items"]
    assert massage["id"] in [s["id"] for s in listed]
    assert all(s["specialty"] == "massage" for s in listed)
    people = (await client.get("/api/v1/specialists", params={"specialty": "massage"})).json()["items"]
    assert str(doctor.id) in [p["id"] for p in people]
    assert set(people[0]) == {"id", "full_name", "specialties", "timezone"}  # no phones
    assert (await client.post("/api/v1/services", headers=patient.headers, json={
        "specialty": "ent", "title": "x", "duration_minutes": 30, "price": "1"})).status_code == 403
    assert (await client.get("/api/v1/services", params={"specialty": "magic"})).status_code == 422


async def test_the_calendar_is_sorted_and_shows_masked_patients(
    client: AsyncTestClient[Any], specialist: Callable[..., Any], service: Callable[..., Any],
    login: Callable[[str], Any], new_phone: Callable[[], str], book: Callable[..., Any],
) -> None:
    psychologist, session_type = await specialist("psychologist", ["psychology"]), await service("psychology")
    booked = []
    for nth in (5, 1, 3):
        who = await login(new_phone())
        await client.patch("/api/v1/me", headers=who.headers, json={"full_name": "Anna Karenina"})
        booked.append((await book(who, psychologist, session_type, nth=nth)).json())
    page = (await client.get("/api/v1/consultations", headers=psychologist.headers, params={"limit": 2})).json()
    rest = (await client.get("/api/v1/consultations", headers=psychologist.headers,
                             params={"limit": 2, "cursor": page["next_cursor"]})).json()
    items = page["items"] + rest["items"]
    assert rest["next_cursor"] is None
    assert [c["starts_at"] for c in items] == sorted(c["starts_at"] for c in booked)
    assert all(c["patient"]["full_name"] is None and c["patient"]["initials"] == "A.K." for c in items)
    pending = (await client.get("/api/v1/consultations", headers=psychologist.headers,
                                params={"status": "completed"})).json()
    assert pending["items"] == []


async def test_my_patients_actual_and_archive(
    client: AsyncTestClient[Any], specialist: Callable[..., Any], service: Callable[..., Any], patient: Session,
    book: Callable[..., Any], visit_until: Callable[..., Any],
) -> None:
    doctor, visit_type = await specialist(), await service()
    await client.patch("/api/v1/me", headers=patient.headers, json={"full_name": "Petr Ivanov",
                                                                     "timezone": "Asia/Vladivostok"})
    await visit_until(patient, doctor, visit_type, "completed")
    archive = (await client.get("/api/v1/my-patients", headers=doctor.headers, params={"tab": "archive"})).json()
    assert [r["patient"]["id"] for r in archive["items"]] == [str(patient.id)]
    assert archive["items"][0]["tz_offset_minutes"] == 7 * 60
    assert (await client.get("/api/v1/my-patients", headers=doctor.headers)).json()["items"] == []
    upcoming = (await book(patient, doctor, visit_type, nth=2)).json()
    actual = (await client.get("/api/v1/my-patients", headers=doctor.headers,
                               params={"tab": "actual", "q": "ivan"})).json()["items"]
    assert actual[0]["next_consultation"]["id"] == upcoming["id"]
    nobody = (await client.get("/api/v1/my-patients", headers=doctor.headers, params={"q": "zzz"})).json()
    assert nobody["items"] == []
    assert (await client.get("/api/v1/my-patients", headers=patient.headers)).status_code == 403


async def test_the_partner_feed_is_cacheable_and_carries_no_personal_data(
    client: AsyncTestClient[Any], specialist: Callable[..., Any],
) -> None:
    doctor = await specialist("doctor", ["ent"])
    first = await client.get("/api/v1/slots/feed", params={"specialty": "ent"})
    assert first.status_code == 200
    etag = first.headers["etag"]
    assert "max-age" in first.headers["cache-control"]
    items = first.json()["items"]
    assert str(doctor.id) in {i["specialist_id"] for i in items}
    assert set(items[0]) == {"id", "specialist_id", "specialties", "starts_at", "ends_at"}
    assert all("ent" in i["specialties"] for i in items)
    again = await client.get("/api/v1/slots/feed", params={"specialty": "ent"}, headers={"If-None-Match": etag})
    assert again.status_code == 304
    assert again.content == b""
    other = await client.get("/api/v1/slots/feed", params={"specialty": "massage"}, headers={"If-None-Match": etag})
    assert other.status_code == 200


async def test_waitlist_hears_of_a_cancelled_slot(
    client: AsyncTestClient[Any], specialist: Callable[..., Any], service: Callable[..., Any], patient: Session,
    login: Callable[[str], Any], new_phone: Callable[[], str], book: Callable[..., Any], staff: Callable[..., Any],
    session_maker: async_sessionmaker[AsyncSession],
) -> None:
    doctor, visit_type = await specialist("doctor", ["urology"]), await service("urology")
    waiting = await login(new_phone())
    request = await client.post("/api/v1/waitlist", headers=waiting.headers, json={
        "specialty": "urology", "specialist_id": str(doctor.id), "note": "any morning"})
    assert request.status_code == 201
    unrelated = await client.post("/api/v1/waitlist", headers=waiting.headers, json={"specialty": "massage"})
    registrar = await staff("registrar")
    listed = (await client.get("/api/v1/waitlist", headers=registrar.headers)).json()["items"]
    assert request.json()["id"] in [w["id"] for w in listed]
    theirs = (await client.get("/api/v1/waitlist", headers=patient.headers)).json()["items"]
    assert request.json()["id"] not in [w["id"] for w in theirs]  # a patient lists only their own
    visit = (await book(patient, doctor, visit_type)).json()
    assert (await client.post(f"/api/v1/consultations/{visit['id']}/cancel", headers=patient.headers,
                              json={"reason": "feeling better"})).status_code == 200
    listed = {w["id"]: w for w in (await client.get("/api/v1/waitlist", headers=registrar.headers)).json()["items"]}
    assert listed[request.json()["id"]]["notified_at"] is not None
    assert listed[unrelated.json()["id"]]["notified_at"] is None
    async with session_maker() as session:
        notices = (await session.scalars(select(OutboxEvent).where(
            OutboxEvent.type == "notice", OutboxEvent.aggregate_id == request.json()["id"]))).all()
    assert notices
    assert notices[0].recipients == [str(waiting.id)]
    assert notices[0].payload["kind"] == "waitlist_slot_available"
    resolved = await client.post(f"/api/v1/waitlist/{request.json()['id']}/resolve", headers=registrar.headers,
                                 json={"resolution": "booked by phone"})
    assert resolved.json()["status"] == "resolved"
    again = await client.post(f"/api/v1/waitlist/{request.json()['id']}/resolve", headers=registrar.headers, json={})
    assert again.status_code == 409


async def test_waitlist_for_someone_elses_dependent_is_404(
    client: AsyncTestClient[Any], patient: Session, login: Callable[[str], Any], new_phone: Callable[[], str],
) -> None:
    other = await login(new_phone())
    child = (await client.post("/api/v1/me/dependents", headers=other.headers, json={
        "full_name": "Kid", "birth_date": "2020-01-01", "relation": "child", "legal_basis": "certificate"})).json()
    answer = await client.post("/api/v1/waitlist", headers=patient.headers,
                               json={"specialty": "pediatrics", "patient_id": child["id"]})
    assert answer.status_code == 404


async def test_slots_keep_reaching_the_horizon_as_days_pass(
    client: AsyncTestClient[Any], specialist: Callable[..., Any], patient: Session,
    session_maker: async_sessionmaker[AsyncSession], test_settings: Any,
) -> None:
    doctor = await specialist(days=2)
    before = await free_slots(client, patient, doctor.id, tz="UTC")
    async with session_maker() as session:  # the last day's slots are missing, as if that day had just come
        last_day = before[-1]["starts_at"][:10]
        await session.execute(delete(Slot).where(Slot.specialist_id == doctor.id,
                                                 Slot.starts_at >= dt.datetime.fromisoformat(last_day + "T00:00:00Z")))
        await session.commit()
    assert len(await free_slots(client, patient, doctor.id, tz="UTC")) < len(before)
    async with session_maker() as session:
        created = await SchedulingService(session, test_settings).extend_horizons()
        again = await SchedulingService(session, test_settings).extend_horizons()
    assert created > 0
    assert again == 0  # idempotent: many instances may run it
    assert [s["id"] for s in await free_slots(client, patient, doctor.id, tz="UTC")][:len(before) - created] == \
        [s["id"] for s in before][:len(before) - created]
    assert len(await free_slots(client, patient, doctor.id, tz="UTC")) == len(before)
