"""Conclusions (ICD-10, analysis orders, medical secrecy), ratings with low-score alerts, and cards through care."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from typing import Any
from uuid import UUID

from litestar.testing import AsyncTestClient
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.chat.models import UserEvent
from app.consultations.models import Rating
from app.outbox import OutboxEvent
from tests.conftest import Session, refused

Maker = async_sessionmaker[AsyncSession]
CHILD = {"full_name": "Sasha Testov", "birth_date": "2017-09-09", "relation": "child",
         "legal_basis": "birth certificate IV-AB 111222"}
DIAGNOSES = [{"code": "E11.9", "title": "Type 2 diabetes mellitus without complications", "main": True},
             {"code": "N97", "title": "Female infertility", "main": False},
             {"code": "E28.2", "title": "Polycystic ovarian syndrome", "main": False}]


async def step(client: AsyncTestClient[Any], who: Session, visit: dict[str, Any], command: str) -> dict[str, Any]:
    answer = await client.post(f"/api/v1/consultations/{visit['id']}/{command}", headers=who.headers)
    assert answer.status_code == 200, answer.text
    body: dict[str, Any] = answer.json()
    return body


def conclusion_url(visit: dict[str, Any]) -> str:
    return f"/api/v1/consultations/{visit['id']}/conclusion"


async def write(client: AsyncTestClient[Any], who: Session, visit: dict[str, Any], **body: Any) -> Any:
    return await client.post(conclusion_url(visit), headers=who.headers, json=body)


async def written(client: AsyncTestClient[Any], who: Session, visit: dict[str, Any], **body: Any) -> dict[str, Any]:
    answer = await write(client, who, visit, **body)
    assert answer.status_code == 201, answer.text
    conclusion: dict[str, Any] = answer.json()
    return conclusion


async def add_child(client: AsyncTestClient[Any], guardian: Session) -> dict[str, Any]:
    answer = await client.post("/api/v1/me/dependents", headers=guardian.headers, json=CHILD)
    assert answer.status_code == 201, answer.text
    child: dict[str, Any] = answer.json()
    return child


async def named(client: AsyncTestClient[Any], patient: Session, full_name: str = "Vera Secretova") -> None:
    answer = await client.patch("/api/v1/me", headers=patient.headers, json={
        "full_name": full_name, "birth_date": "1985-04-04", "questionnaire": {"cycle": "irregular"}})
    assert answer.status_code == 200, answer.text


# --- writing --------------------------------------------------------------------------------------


async def test_only_the_own_specialist_writes_once_after_the_start(
    client: AsyncTestClient[Any], patient: Session, admin: Session, staff: Callable[..., Any],
    specialist: Callable[..., Any], service: Callable[..., Any], session_maker: Maker, visit_until: Callable[..., Any],
) -> None:
    doctor = await specialist()
    other_doctor = await specialist()
    svc = await service()
    registrar, methodist = await staff("registrar"), await staff("methodist")
    await visit_until(patient, other_doctor, svc, until="booked", nth=1)  # in care, still not theirs
    pending = await visit_until(patient, doctor, svc, until="booked", nth=2)  # one place at a time: another hour
    refused(await write(client, doctor, pending, diagnoses=DIAGNOSES), 409, "consultation_not_started")
    visit = await step(client, registrar, pending, "confirm")
    refused(await write(client, doctor, visit, diagnoses=DIAGNOSES), 409, "consultation_not_started")
    for who in (patient, registrar, admin, methodist):
        refused(await write(client, who, visit, diagnoses=DIAGNOSES), 403)
    await step(client, doctor, visit, "start")
    refused(await write(client, other_doctor, visit, diagnoses=DIAGNOSES), 404)
    refused(await client.get(conclusion_url(visit), headers=patient.headers), 404)  # none yet

    body = {"diagnoses": DIAGNOSES, "recommendations": "Low-carb diet, 30 min walks daily",
            "treatment": "Metformin 500 mg twice a day", "analysis_orders": [],
            "follow_up": {"service_id": svc["id"], "after_days": 30, "note": "bring the HbA1c result"}}
    conclusion = await written(client, doctor, visit, **body)
    assert conclusion["consultation_id"] == visit["id"]
    assert conclusion["patient_id"] == str(patient.id)
    assert conclusion["author_id"] == str(doctor.id)
    assert conclusion["diagnoses"] == DIAGNOSES
    assert (conclusion["recommendations"], conclusion["treatment"]) == (body["recommendations"], body["treatment"])
    assert conclusion["follow_up"] == body["follow_up"]
    assert conclusion["analysis_orders"] == []
    again = await write(client, doctor, visit, diagnoses=[{"code": "E66.0", "title": "Obesity", "main": True}])
    refused(again, 409, "conclusion_exists")
    read = await client.get(conclusion_url(visit), headers=patient.headers)
    assert read.status_code == 200, read.text
    assert read.json() == conclusion  # the first one stands

    async with session_maker() as db:
        notices = (await db.scalars(select(OutboxEvent).where(
            OutboxEvent.aggregate_id == UUID(conclusion["id"]), OutboxEvent.type == "notice"))).all()
    assert [(n.recipients, n.payload["kind"]) for n in notices] == [([str(patient.id)], "conclusion_ready")]
    ready = {"kind": "conclusion_ready", "consultation_id": visit["id"]}
    assert ready in await live_notices(session_maker, patient.id)  # live too, to the patient's side only
    assert ready not in await live_notices(session_maker, doctor.id)

    done = await visit_until(patient, doctor, svc, until="completed", nth=2)  # not when the other visit is
    late = await written(client, doctor, done, recommendations="Repeat the ultrasound in three months")
    assert late["diagnoses"] == []  # a conclusion without a diagnosis is allowed, and after completion too


async def test_diagnoses_are_icd10_codes_with_exactly_one_main(
    client: AsyncTestClient[Any], patient: Session, specialist: Callable[..., Any],
    service: Callable[..., Any], visit_until: Callable[..., Any],
) -> None:
    doctor = await specialist()
    svc = await service()
    visit = await visit_until(patient, doctor, svc, until="in_progress", nth=1)
    for code in ("U07.1", "123", "E11.", "E 11", "11E", "EE1", "E11-9", "E1", "E", "E11.12345"):
        answer = await write(client, doctor, visit, diagnoses=[{"code": code, "title": "x", "main": True}])
        refused(answer, 422, "icd10_invalid")
    refused(await write(client, doctor, visit, diagnoses=[{"code": "E" * 17, "title": "x", "main": True}]), 422,
            "invalid_input")
    one_bad = [*DIAGNOSES, {"code": "123", "title": "not a code", "main": False}]
    refused(await write(client, doctor, visit, diagnoses=one_bad), 422, "icd10_invalid")
    no_main = [{**d, "main": False} for d in DIAGNOSES]
    refused(await write(client, doctor, visit, diagnoses=no_main), 422, "main_diagnosis_required")
    two_main = [{**d, "main": d["code"] != "N97"} for d in DIAGNOSES]
    refused(await write(client, doctor, visit, diagnoses=two_main), 422, "main_diagnosis_required")
    refused(await write(client, doctor, visit, diagnoses=[{"code": "E11.9", "title": "", "main": True}]), 422,
            "invalid_input")
    refused(await client.get(conclusion_url(visit), headers=doctor.headers), 404)  # nothing half-written

    ok = await written(client, doctor, visit, diagnoses=DIAGNOSES)
    assert [(d["code"], d["main"]) for d in ok["diagnoses"]] == [("E11.9", True), ("N97", False), ("E28.2", False)]


async def test_a_lowercase_code_is_stored_in_capitals(
    client: AsyncTestClient[Any], patient: Session, specialist: Callable[..., Any],
    service: Callable[..., Any], visit_until: Callable[..., Any],
) -> None:
    doctor = await specialist()
    svc = await service()
    visit = await visit_until(patient, doctor, svc, until="in_progress", nth=1)
    ok = await written(client, doctor, visit, diagnoses=[{"code": " e11 ", "title": " Diabetes ", "main": True}])
    assert ok["diagnoses"] == [{"code": "E11", "title": "Diabetes", "main": True}]


async def test_analysis_orders_round_trip_and_only_their_author_updates_them(
    client: AsyncTestClient[Any], patient: Session, staff: Callable[..., Any], specialist: Callable[..., Any],
    service: Callable[..., Any], visit_until: Callable[..., Any],
) -> None:
    doctor = await specialist()
    other_doctor = await specialist()
    psychologist = await specialist("psychologist", ["psychology"])
    svc = await service()
    registrar = await staff("registrar")
    await visit_until(patient, other_doctor, svc, until="booked", nth=1)
    visit = await visit_until(patient, doctor, svc, until="in_progress", nth=2)
    ready_on = (dt.date.today() + dt.timedelta(days=5)).isoformat()
    orders = [{"name": "HbA1c", "status": "ordered", "expected_ready_on": ready_on},
              {"name": "TSH", "status": "sample_taken", "expected_ready_on": None},
              {"name": " Fasting glucose "}]
    conclusion = await written(client, doctor, visit, diagnoses=DIAGNOSES, analysis_orders=orders)
    expected = [("HbA1c", "ordered", ready_on), ("TSH", "sample_taken", None), ("Fasting glucose", "ordered", None)]

    def shape(items: list[dict[str, Any]]) -> list[tuple[str, str, str | None]]:
        return [(o["name"], o["status"], o["expected_ready_on"]) for o in items]

    assert shape(conclusion["analysis_orders"]) == expected
    read = (await client.get(conclusion_url(visit), headers=patient.headers)).json()
    assert sorted(shape(read["analysis_orders"])) == sorted(expected)
    assert {o["id"] for o in read["analysis_orders"]} == {o["id"] for o in conclusion["analysis_orders"]}

    tsh = next(o for o in conclusion["analysis_orders"] if o["name"] == "TSH")
    url = f"/api/v1/analysis-orders/{tsh['id']}"
    for outsider in (other_doctor, psychologist):
        refused(await client.patch(url, headers=outsider.headers, json={"status": "ready"}), 404)
    for back_office in (patient, registrar):
        refused(await client.patch(url, headers=back_office.headers, json={"status": "ready"}), 403)
    refused(await client.patch(url, headers=doctor.headers, json={"status": "lost"}), 422, "invalid_input")
    refused(await client.patch("/api/v1/analysis-orders/00000000-0000-0000-0000-000000000000",
                               headers=doctor.headers, json={"status": "ready"}), 404)
    updated = await client.patch(url, headers=doctor.headers, json={"status": "ready"})
    assert updated.status_code == 200, updated.text
    assert updated.json() == {**tsh, "status": "ready"}
    after = (await client.get(conclusion_url(visit), headers=patient.headers)).json()
    assert {o["name"]: o["status"] for o in after["analysis_orders"]} == {
        "HbA1c": "ordered", "TSH": "ready", "Fasting glucose": "ordered"}


# --- who reads a conclusion -----------------------------------------------------------------------


async def test_conclusion_visibility_follows_medical_secrecy(
    client: AsyncTestClient[Any], patient: Session, admin: Session, staff: Callable[..., Any],
    specialist: Callable[..., Any], service: Callable[..., Any],
    login: Callable[[str], Any], new_phone: Callable[[], str], visit_until: Callable[..., Any],
) -> None:
    author = await specialist()
    doctor_in_care = await specialist("doctor", ["endocrinology", "gynecology"])
    doctor_outside = await specialist()
    psych_author = await specialist("psychologist", ["psychology"])
    psych_in_care = await specialist("psychologist", ["psychology"])
    psych_outside = await specialist("psychologist", ["psychology"])
    registrar, methodist = await staff("registrar"), await staff("methodist")
    stranger = await login(new_phone())
    endo, psy = await service(), await service("psychology")

    medical = await visit_until(patient, author, endo, until="in_progress", nth=1)
    by_doctor = await written(client, author, medical, diagnoses=DIAGNOSES, treatment="Metformin")
    therapy = await visit_until(patient, psych_author, psy, until="in_progress", nth=2)
    by_psych = await written(client, psych_author, therapy, recommendations="Keep a mood diary")
    await visit_until(patient, doctor_in_care, endo, until="confirmed", nth=3)  # a confirmed future visit is care
    await visit_until(patient, psych_in_care, psy, until="confirmed", nth=4)

    def url(visit: dict[str, Any]) -> str:
        return conclusion_url(visit)

    for reader in (patient, author, doctor_in_care):
        answer = await client.get(url(medical), headers=reader.headers)
        assert answer.status_code == 200, (reader.id, answer.text)
        assert answer.json() == by_doctor
    for reader in (patient, psych_author, psych_in_care, doctor_in_care):
        answer = await client.get(url(therapy), headers=reader.headers)
        assert answer.status_code == 200, (reader.id, answer.text)
        assert answer.json() == by_psych
    for outsider in (psych_in_care, psych_author, doctor_outside, psych_outside, stranger, registrar, admin,
                     methodist):
        refused(await client.get(url(medical), headers=outsider.headers), 404)
    for outsider in (doctor_outside, psych_outside, stranger, registrar, admin, methodist):
        refused(await client.get(url(therapy), headers=outsider.headers), 404)


async def test_a_guardian_reads_the_conclusion_for_a_dependent(
    client: AsyncTestClient[Any], patient: Session, specialist: Callable[..., Any],
    service: Callable[..., Any], login: Callable[[str], Any],
    new_phone: Callable[[], str], visit_until: Callable[..., Any],
) -> None:
    pediatrician = await specialist("doctor", ["pediatrics"])
    svc = await service("pediatrics")
    child = await add_child(client, patient)
    visit = await visit_until(patient, pediatrician, svc, until="completed",
                           patient_id=child["id"], nth=1)
    assert visit["patient_id"] == child["id"]
    conclusion = await written(client, pediatrician, visit,
                               diagnoses=[{"code": "J06.9", "title": "Acute URI", "main": True}])
    assert conclusion["patient_id"] == child["id"]
    read = await client.get(conclusion_url(visit), headers=patient.headers)
    assert read.status_code == 200, read.text
    assert read.json() == conclusion
    other_parent = await login(new_phone())
    refused(await client.get(conclusion_url(visit), headers=other_parent.headers), 404)


# --- ratings --------------------------------------------------------------------------------------


async def low_alerts(client: AsyncTestClient[Any], admin: Session) -> list[dict[str, Any]]:
    answer = await client.get("/api/v1/alerts/ratings", headers=admin.headers, params={"limit": 100})
    assert answer.status_code == 200, answer.text
    items: list[dict[str, Any]] = answer.json()["items"]
    return items


async def rating_notices(session_maker: Maker, consultation_id: str) -> list[OutboxEvent]:
    async with session_maker() as db:
        rating_id = await db.scalar(select(Rating.id).where(Rating.consultation_id == UUID(consultation_id)))
        assert rating_id is not None
        return list((await db.scalars(select(OutboxEvent).where(
            OutboxEvent.aggregate_id == rating_id, OutboxEvent.type == "notice"))).all())


async def test_the_patient_rates_a_completed_visit_once(
    client: AsyncTestClient[Any], patient: Session, admin: Session, staff: Callable[..., Any],
    specialist: Callable[..., Any], service: Callable[..., Any],
    login: Callable[[str], Any], new_phone: Callable[[], str], session_maker: Maker, visit_until: Callable[..., Any],
) -> None:
    doctor = await specialist()
    svc = await service()
    registrar = await staff("registrar")
    stranger = await login(new_phone())

    def rate(who: Session, visit: dict[str, Any], body: Any) -> Any:
        return client.post(f"/api/v1/consultations/{visit['id']}/rating", headers=who.headers, json=body)

    for until in ("booked", "confirmed", "in_progress"):
        early = await visit_until(patient, doctor, svc, until=until, nth=1)
        refused(await rate(patient, early, {"score": 5}), 409, "not_completed")
    visit = await visit_until(patient, doctor, svc, until="completed", nth=1)
    for score in (0, 6, -1, 4.5, None, "five"):
        refused(await rate(patient, visit, {"score": score}), 422, "invalid_input")
    refused(await rate(stranger, visit, {"score": 5}), 404)
    for staff_member in (doctor, registrar, admin):
        refused(await rate(staff_member, visit, {"score": 5}), 403)

    answer = await rate(patient, visit, {"score": 5, "comment": "  Very attentive doctor  "})
    assert answer.status_code == 201, answer.text
    body = answer.json()
    assert (body["consultation_id"], body["specialist_id"], body["score"], body["comment"]) == (
        visit["id"], str(doctor.id), 5, "Very attentive doctor")
    refused(await rate(patient, visit, {"score": 1}), 409, "already_rated")
    assert visit["id"] not in {r["consultation_id"] for r in await low_alerts(client, admin)}
    assert await rating_notices(session_maker, visit["id"]) == []


async def live_notices(session_maker: Maker, user_id: UUID) -> list[dict[str, Any]]:
    """The `notice` events in a user's realtime stream."""
    async with session_maker() as db:
        return list((await db.scalars(select(UserEvent.data).where(
            UserEvent.recipient_id == user_id, UserEvent.type == "notice").order_by(UserEvent.seq))).all())


async def test_a_poor_rating_alerts_the_admins(
    client: AsyncTestClient[Any], patient: Session, admin: Session, staff: Callable[..., Any],
    specialist: Callable[..., Any], service: Callable[..., Any], session_maker: Maker, visit_until: Callable[..., Any],
) -> None:
    doctor = await specialist()
    svc = await service()
    registrar = await staff("registrar")
    child = await add_child(client, patient)
    for score, who_for in ((1, {}), (2, {"patient_id": child["id"]})):
        visit = await visit_until(patient, doctor, svc, until="completed", **who_for, nth=1)
        answer = await client.post(f"/api/v1/consultations/{visit['id']}/rating", headers=patient.headers,
                                   json={"score": score, "comment": "waited an hour"})
        assert answer.status_code == 201, answer.text
        alerts = [r for r in await low_alerts(client, admin) if r["consultation_id"] == visit["id"]]
        assert [(r["score"], r["specialist_id"], r["comment"]) for r in alerts] == [
            (score, str(doctor.id), "waited an hour")]
        notices = await rating_notices(session_maker, visit["id"])
        alert = {"kind": "low_rating", "consultation_id": visit["id"], "score": score}
        assert [(n.recipients, n.payload) for n in notices] == [(["role:admin"], alert)]
        assert alert in await live_notices(session_maker, admin.id)  # live in every admin's stream
        for not_admin in (patient, registrar, doctor):
            assert alert not in await live_notices(session_maker, not_admin.id)
    for not_admin in (patient, registrar, doctor, await staff("methodist")):
        refused(await client.get("/api/v1/alerts/ratings", headers=not_admin.headers), 403)


# --- the patient card through care ----------------------------------------------------------------


async def test_a_consultation_opens_the_card_through_the_clinicians_mask(
    client: AsyncTestClient[Any], patient: Session, specialist: Callable[..., Any],
    service: Callable[..., Any], visit_until: Callable[..., Any],
) -> None:
    await named(client, patient)
    doctor = await specialist()
    doctor_outside = await specialist()
    psychologist = await specialist("psychologist", ["psychology"])
    card_url = f"/api/v1/patients/{patient.id}"
    for who in (doctor, psychologist):
        refused(await client.get(card_url, headers=who.headers), 404)
    await visit_until(patient, doctor, await service(), until="confirmed", nth=1)
    await visit_until(patient, psychologist, await service("psychology"), until="confirmed", nth=2)

    full = await client.get(card_url, headers=doctor.headers)
    assert full.status_code == 200, full.text
    card = full.json()
    assert (card["id"], card["full_name"], card["initials"], card["phone"], card["birth_date"]) == (
        str(patient.id), "Vera Secretova", "V.S.", patient.phone, "1985-04-04")
    assert card["questionnaire"] == {"cycle": "irregular"}

    masked = await client.get(card_url, headers=psychologist.headers)
    assert masked.status_code == 200, masked.text
    shown = masked.json()
    assert set(shown) == set(card)  # the same shape, hidden fields null
    assert (shown["id"], shown["initials"], shown["age"]) == (str(patient.id), "V.S.", card["age"])
    assert shown["age"] is not None
    for hidden in ("full_name", "birth_date", "phone", "questionnaire", "sex", "guardian_id"):
        assert shown[hidden] is None, hidden

    refused(await client.get(card_url, headers=doctor_outside.headers), 404)
