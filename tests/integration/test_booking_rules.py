"""Booking rules that hold: one place at a time, whom a direction serves, when a visit starts, fair holds.

Their races run over real HTTP in tests/e2e/test_booking_races.py (the test client sends one request at a time)."""

from __future__ import annotations

import datetime as dt
import secrets
from collections.abc import Callable
from typing import Any
from uuid import UUID

import msgspec
from litestar.testing import AsyncTestClient
from sqlalchemy import event

from app.accounts.models import User
from app.settings import Settings
from tests.conftest import Session, refused, running
from tests.integration.conftest import free_slots

ADULT = {"full_name": "Anna Testova", "birth_date": "1990-03-03"}


async def same_time_slot(client: AsyncTestClient[Any], who: Session, specialist: Session, starts_at: str) -> Any:
    """The specialist's free slot that starts when the given one does (every test schedule has one grid)."""
    wanted = dt.datetime.fromisoformat(starts_at)
    return next(s for s in await free_slots(client, who, specialist.id)
                if dt.datetime.fromisoformat(s["starts_at"]) == wanted)


async def booked_at(client: AsyncTestClient[Any], who: Session, slot: Any, service: dict[str, Any],
                    **extra: Any) -> Any:
    return await client.post("/api/v1/consultations", headers=who.headers, json={
        "slot_id": slot["id"], "service_id": service["id"], "format": "in_person", **extra})


async def add_child(client: AsyncTestClient[Any], guardian: Session, **extra: Any) -> dict[str, Any]:
    answer = await client.post("/api/v1/me/dependents", headers=guardian.headers, json={
        "full_name": f"Kid {secrets.token_hex(3)}", "birth_date": "2018-06-01", "relation": "child",
        "legal_basis": "birth certificate", **extra})
    assert answer.status_code == 201, answer.text
    child: dict[str, Any] = answer.json()
    return child


# --- one person, one place at a time -----------------------------------------------------------------------


async def test_a_patient_is_never_booked_twice_at_once(
    client: AsyncTestClient[Any], specialist: Callable[..., Any], service: Callable[..., Any], patient: Session,
    staff: Callable[..., Any],
) -> None:
    first, second, visit_type = await specialist(), await specialist(), await service()
    registrar = await staff("registrar")
    slot = (await free_slots(client, patient, first.id))[1]
    assert (await booked_at(client, patient, slot, visit_type)).status_code == 201
    clash = await same_time_slot(client, patient, second, slot["starts_at"])
    refused(await booked_at(client, patient, clash, visit_type), 409, "patient_busy")  # the patient's app
    refused(await booked_at(client, registrar, clash, visit_type, patient_id=str(patient.id)), 409, "patient_busy")
    refused(await booked_at(client, registrar, clash, visit_type, patient_phone=patient.phone), 409, "patient_busy")
    assert clash["id"] in [s["id"] for s in await free_slots(client, patient, second.id)]  # nothing half-written
    after = (await free_slots(client, patient, second.id))
    ends = dt.datetime.fromisoformat(slot["ends_at"])
    later = next(s for s in after if dt.datetime.fromisoformat(s["starts_at"]) >= ends)  # back to back is fine
    assert (await booked_at(client, patient, later, visit_type)).status_code == 201


async def test_a_dependent_is_one_person_too_and_a_cancelled_visit_frees_them(
    client: AsyncTestClient[Any], specialist: Callable[..., Any], service: Callable[..., Any], patient: Session,
) -> None:
    first, second, third = (await specialist("doctor", ["pediatrics"]),
                            await specialist("doctor", ["pediatrics", "endocrinology"]),
                            await specialist("doctor", ["pediatrics"]))
    kids, adults = await service("pediatrics"), await service()
    child = await add_child(client, patient)
    slot = (await free_slots(client, patient, first.id))[1]
    visit = await booked_at(client, patient, slot, kids, patient_id=child["id"])
    assert visit.status_code == 201, visit.text
    clash = await same_time_slot(client, patient, second, slot["starts_at"])
    refused(await booked_at(client, patient, clash, kids, patient_id=child["id"]), 409, "patient_busy")
    mine = await booked_at(client, patient, clash, adults)  # the guardian is another person
    assert mine.status_code == 201, mine.text
    cancelled = await client.post(f"/api/v1/consultations/{visit.json()['id']}/cancel", headers=patient.headers,
                                  json={"reason": "plans changed"})
    assert cancelled.status_code == 200, cancelled.text
    again = await same_time_slot(client, patient, third, slot["starts_at"])
    assert (await booked_at(client, patient, again, kids, patient_id=child["id"])).status_code == 201


# --- whom a direction serves -------------------------------------------------------------------------------


async def test_directions_serve_by_age_and_sex(
    client: AsyncTestClient[Any], specialist: Callable[..., Any], service: Callable[..., Any], patient: Session,
    login: Callable[[str], Any], new_phone: Callable[[], str],
) -> None:
    listed = {s["code"]: s["rules"] for s in (await client.get("/api/v1/specialties")).json()["items"]}
    assert listed["pediatrics"] == {"min_age": None, "max_age": 17, "sex": None}  # the migration's defaults
    assert listed["gynecology"] == {"min_age": None, "max_age": None, "sex": "female"}
    assert listed["endocrinology"] == {"min_age": None, "max_age": None, "sex": None}
    pediatrician, gynecologist = await specialist("doctor", ["pediatrics"]), await specialist("doctor", ["gynecology"])
    kids, women = await service("pediatrics"), await service("gynecology")
    refused(await booked_at(client, patient, (await free_slots(client, patient, pediatrician.id))[1], kids),
            422, "birth_date_required")
    refused(await booked_at(client, patient, (await free_slots(client, patient, gynecologist.id))[1], women),
            422, "sex_required")
    assert (await client.patch("/api/v1/me", headers=patient.headers, json={**ADULT, "sex": "female"})).json()[
        "sex"] == "female"
    refused(await booked_at(client, patient, (await free_slots(client, patient, pediatrician.id))[1], kids),
            422, "patient_too_old")
    assert (await booked_at(client, patient, (await free_slots(client, patient, gynecologist.id))[1],
                            women)).status_code == 201
    man = await login(new_phone())
    await client.patch("/api/v1/me", headers=man.headers, json={"birth_date": "1980-01-01", "sex": "male"})
    refused(await booked_at(client, man, (await free_slots(client, man, gynecologist.id))[2], women),
            422, "patient_sex_not_served")
    son = await add_child(client, man, sex="male")
    assert son["sex"] == "male"
    assert (await booked_at(client, man, (await free_slots(client, man, pediatrician.id))[2], kids,
                            patient_id=son["id"])).status_code == 201


async def test_the_call_centre_records_what_a_new_callers_direction_needs(
    client: AsyncTestClient[Any], specialist: Callable[..., Any], service: Callable[..., Any],
    staff: Callable[..., Any], new_phone: Callable[[], str], session_maker: Any,
) -> None:
    registrar, gynecologist, women = await staff("registrar"), await specialist("doctor", ["gynecology"]), \
        await service("gynecology")
    phone, slots = new_phone(), await free_slots(client, registrar, gynecologist.id)
    refused(await booked_at(client, registrar, slots[1], women, patient_phone=phone, patient_name="Olga N"),
            422, "sex_required")  # a card made on the phone knows nothing yet
    booked = await booked_at(client, registrar, slots[1], women, patient_phone=phone, patient_name="Olga N",
                             patient_sex="female", patient_birth_date="1991-02-03")
    assert booked.status_code == 201, booked.text
    async with session_maker() as session:
        card = await session.get(User, UUID(booked.json()["patient_id"]))
        assert (card.sex, card.birth_date) == ("female", dt.date(1991, 2, 3))
    # what the card says stays: a later booking naming another sex and birth date changes nothing
    again = await booked_at(client, registrar, slots[3], women, patient_phone=phone, patient_sex="male",
                            patient_birth_date="1950-01-01")
    assert again.status_code == 201, again.text  # the card is still a woman's: the direction still serves her
    async with session_maker() as session:
        card = await session.get(User, UUID(booked.json()["patient_id"]))
        assert (card.sex, card.birth_date) == ("female", dt.date(1991, 2, 3))
    refused(await booked_at(client, registrar, slots[5], women, patient_phone=new_phone(), patient_sex="female",
                            patient_birth_date="2999-01-01"), 422, "birth_date_invalid")


async def test_a_child_turning_eighteen_before_the_visit_is_an_adult_by_then(
    client: AsyncTestClient[Any], specialist: Callable[..., Any], service: Callable[..., Any], patient: Session,
) -> None:
    pediatrician, kids = await specialist("doctor", ["pediatrics"], days=3), await service("pediatrics")
    slot = (await free_slots(client, patient, pediatrician.id, tz="Europe/Moscow"))[-1]
    visit_day = dt.date.fromisoformat(slot["starts_at"][:10])
    born = visit_day.replace(year=visit_day.year - 18)  # eighteen on the visit's day, seventeen today
    child = await add_child(client, patient, birth_date=born.isoformat())
    refused(await booked_at(client, patient, slot, kids, patient_id=child["id"]), 422, "patient_too_old")


async def test_the_admin_sets_a_directions_rules(
    client: AsyncTestClient[Any], admin: Session, staff: Callable[..., Any], specialist: Callable[..., Any],
    service: Callable[..., Any], patient: Session,
) -> None:
    registrar = await staff("registrar")
    url = "/api/v1/specialties/ent/rules"
    refused(await client.put(url, headers=registrar.headers, json={"min_age": 3}), 403)
    refused(await client.put(url, headers=patient.headers, json={"min_age": 3}), 403)
    refused(await client.put(url, headers=admin.headers, json={"min_age": 10, "max_age": 5}), 422, "rules_invalid")
    refused(await client.put(url, headers=admin.headers, json={"min_age": -1}), 422)
    refused(await client.put(url, headers=admin.headers, json={"sex": "other"}), 422)
    refused(await client.put("/api/v1/specialties/astrology/rules", headers=admin.headers, json={}), 422)
    try:
        answer = await client.put(url, headers=admin.headers, json={"min_age": 12})
        assert answer.status_code == 200, answer.text
        assert answer.json() == {"code": "ent", "title": "ENT (otorhinolaryngology)",
                                 "rules": {"min_age": 12, "max_age": None, "sex": None}}
        listed = {s["code"]: s["rules"] for s in (await client.get("/api/v1/specialties")).json()["items"]}
        assert listed["ent"]["min_age"] == 12
        doctor, visit_type = await specialist("doctor", ["ent"]), await service("ent")
        child = await add_child(client, patient)  # about eight
        refused(await booked_at(client, patient, (await free_slots(client, patient, doctor.id))[1], visit_type,
                                patient_id=child["id"]), 422, "patient_too_young")
    finally:  # the rules are the clinic's, shared by every test: back to none
        cleared = await client.put(url, headers=admin.headers, json={})
        assert cleared.json()["rules"] == {"min_age": None, "max_age": None, "sex": None}


async def test_sex_is_on_the_card_for_the_doctor_not_for_the_front_desk(
    client: AsyncTestClient[Any], specialist: Callable[..., Any], service: Callable[..., Any], patient: Session,
    staff: Callable[..., Any], visit_until: Callable[..., Any],
) -> None:
    refused(await client.patch("/api/v1/me", headers=patient.headers, json={"sex": "x"}), 422)
    me = await client.patch("/api/v1/me", headers=patient.headers, json={"sex": "male"})
    assert me.json()["sex"] == "male"
    doctor, visit_type = await specialist(), await service()
    await visit_until(patient, doctor, visit_type, nth=1)  # confirmed: the doctor's patient now
    card = (await client.get(f"/api/v1/patients/{patient.id}", headers=doctor.headers)).json()
    assert card["sex"] == "male"
    registrar = await staff("registrar")
    assert (await client.get(f"/api/v1/patients/{patient.id}", headers=registrar.headers)).json()["sex"] is None


# --- when a visit starts -----------------------------------------------------------------------------------


async def test_a_visit_starts_from_a_quarter_of_an_hour_before_its_time(
    client: AsyncTestClient[Any], test_settings: Settings, specialist: Callable[..., Any],
    service: Callable[..., Any], patient: Session, visit_until: Callable[..., Any],
) -> None:
    doctor, visit_type = await specialist(slot_minutes=10), await service(duration=10)
    now = dt.datetime.now(dt.UTC)
    slots = await free_slots(client, patient, doctor.id)
    starts = [dt.datetime.fromisoformat(s["starts_at"]) for s in slots]
    # one slot a minute or more ahead yet within the quarter of an hour (10-minute slots: always one), one far
    soon = next(i for i, t in enumerate(starts) if t >= now + dt.timedelta(minutes=1))
    far = next(i for i, t in enumerate(starts) if t >= now + dt.timedelta(hours=2))
    assert starts[soon] < now + dt.timedelta(minutes=12)
    early = await visit_until(patient, doctor, visit_type, nth=far)
    near = await visit_until(patient, doctor, visit_type, nth=soon)
    async with running(msgspec.structs.replace(test_settings, start_early_minutes=15)) as clinic:
        refused(await clinic.post(f"/api/v1/consultations/{early['id']}/start", headers=doctor.headers), 409,
                "too_early_to_start")
        started = await clinic.post(f"/api/v1/consultations/{near['id']}/start", headers=doctor.headers)
        assert started.status_code == 200, started.text
        assert started.json()["status"] == "in_progress"


async def test_an_online_visit_starts_once_paid(
    client: AsyncTestClient[Any], specialist: Callable[..., Any], service: Callable[..., Any], patient: Session,
    staff: Callable[..., Any], visit_until: Callable[..., Any],
) -> None:
    doctor, visit_type = await specialist(), await service(price="3500.00")
    await visit_until(patient, doctor, visit_type, "completed", nth=1)
    online = await visit_until(patient, doctor, visit_type, nth=2, fmt="online")
    assert online["format"] == "online"
    url = f"/api/v1/consultations/{online['id']}"
    refused(await client.post(f"{url}/start", headers=doctor.headers), 409, "payment_required")
    registrar = await staff("registrar")
    paid = await client.post(f"{url}/pay", headers=registrar.headers, json={
        "amount": "3500.00", "method": "card", "reference": f"desk-{secrets.token_hex(6)}"})
    assert paid.status_code == 200, paid.text
    started = await client.post(f"{url}/start", headers=doctor.headers)
    assert started.status_code == 200, started.text
    in_person = await visit_until(patient, doctor, visit_type, nth=3)  # unpaid in person: the desk takes it after
    assert (await client.post(f"/api/v1/consultations/{in_person['id']}/start",
                              headers=doctor.headers)).status_code == 200


async def test_an_unpaid_online_visit_starts_where_the_clinic_does_not_require_prepayment(
    client: AsyncTestClient[Any], test_settings: Settings, specialist: Callable[..., Any],
    service: Callable[..., Any], patient: Session, visit_until: Callable[..., Any],
) -> None:
    doctor, visit_type = await specialist(), await service()
    await visit_until(patient, doctor, visit_type, "completed", nth=1)
    online = await visit_until(patient, doctor, visit_type, nth=2, fmt="online")
    async with running(msgspec.structs.replace(test_settings, online_prepaid=False)) as clinic:
        started = await clinic.post(f"/api/v1/consultations/{online['id']}/start", headers=doctor.headers)
    assert started.status_code == 200, started.text


async def test_refusals_of_commands_read_as_english(
    client: AsyncTestClient[Any], specialist: Callable[..., Any], service: Callable[..., Any], patient: Session,
    visit_until: Callable[..., Any],
) -> None:
    doctor, visit_type = await specialist(), await service()
    visit = await visit_until(patient, doctor, visit_type, "completed", nth=1)
    url = f"/api/v1/consultations/{visit['id']}"
    cancel = await client.post(f"{url}/cancel", headers=patient.headers, json={"reason": "x"})
    refused(cancel, 409, "transition_not_allowed")
    assert cancel.json()["detail"] == "a consultation already completed cannot be cancelled"
    no_show = await client.post(f"{url}/no-show", headers=doctor.headers)
    assert no_show.json()["detail"] == "a consultation already completed cannot be marked as a no-show"
    complete = await client.post(f"{url}/complete", headers=doctor.headers)
    assert complete.json()["detail"] == "a consultation already completed cannot be completed"
    started = await client.post(f"{url}/start", headers=doctor.headers)
    assert started.json()["detail"] == "a consultation already completed cannot be started"


# --- holds are a fair share --------------------------------------------------------------------------------


async def test_a_patient_holds_at_most_two_slots_and_a_hold_again_is_the_same_hold(
    client: AsyncTestClient[Any], specialist: Callable[..., Any], service: Callable[..., Any], patient: Session,
    staff: Callable[..., Any],
) -> None:
    doctor, visit_type = await specialist("massage_therapist", ["massage"]), await service("massage")
    slots = await free_slots(client, patient, doctor.id)

    async def hold(who: Session, slot: Any) -> Any:
        return await client.post(f"/api/v1/slots/{slot['id']}/hold", headers=who.headers)

    first, second = await hold(patient, slots[1]), await hold(patient, slots[2])
    assert (first.status_code, second.status_code) == (201, 201)
    refused(await hold(patient, slots[3]), 409, "too_many_holds")
    again = await hold(patient, slots[1])
    assert again.status_code == 201
    assert again.json() == first.json()  # the same hold, ending when it did: no renewal
    booked = await booked_at(client, patient, slots[1], visit_type, hold_id=first.json()["hold_id"])
    assert booked.status_code == 201, booked.text
    assert (await hold(patient, slots[3])).status_code == 201  # a booked hold no longer counts
    registrar = await staff("registrar")  # the front desk holds for many callers at once
    for slot in slots[4:9]:
        assert (await hold(registrar, slot)).status_code == 201


async def test_the_catalogue_reads_the_rules_once_per_window_and_a_change_at_once(
    client: AsyncTestClient[Any], admin: Session,
) -> None:
    statements: list[str] = []

    def seen(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        statements.append(statement)

    def ent() -> Any:
        return next(s["rules"] for s in listed.json()["items"] if s["code"] == "ent")

    engine = client.app.state.engine.sync_engine
    listed = await client.get("/api/v1/specialties")
    assert listed.status_code == 200, listed.text
    event.listen(engine, "before_cursor_execute", seen)
    try:
        listed = await client.get("/api/v1/specialties")
        assert listed.status_code == 200, listed.text
        assert not [s for s in statements if "specialty_rule" in s]  # the public catalogue, from memory
        url = "/api/v1/specialties/ent/rules"
        try:
            assert (await client.put(url, headers=admin.headers, json={"max_age": 90})).status_code == 200
            listed = await client.get("/api/v1/specialties")
            assert ent() == {"min_age": None, "max_age": 90, "sex": None}  # this instance forgot the old rules
        finally:
            assert (await client.put(url, headers=admin.headers, json={})).status_code == 200
        listed = await client.get("/api/v1/specialties")
        assert ent() == {"min_age": None, "max_age": None, "sex": None}
    finally:
        event.remove(engine, "before_cursor_execute", seen)
