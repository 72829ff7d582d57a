"""The consultation state machine: confirm, start, complete, cancel, no-show and payments, by role and party."""

from __future__ import annotations

import datetime as dt
import secrets
from collections.abc import Callable
from typing import Any
from uuid import UUID

from litestar.testing import AsyncTestClient
from sqlalchemy import func, select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.consultations.models import Consultation
from app.outbox import OutboxEvent
from app.payments.models import Payment
from tests.conftest import Session, refused
from tests.integration.conftest import free_slots

CHILD = {"full_name": "Petya Testov", "birth_date": "2018-06-01", "relation": "child",
         "legal_basis": "birth certificate III-AB 654321"}
Maker = async_sessionmaker[AsyncSession]


async def act(client: AsyncTestClient[Any], who: Session, visit: dict[str, Any] | str, command: str,
              **body: Any) -> Any:
    cid = visit if isinstance(visit, str) else visit["id"]
    return await client.post(f"/api/v1/consultations/{cid}/{command}", headers=who.headers, json=body or None)


async def move_start(session_maker: Maker, visit: dict[str, Any], *, starts_ago: dt.timedelta,
                     ends_in: dt.timedelta) -> None:
    """Let time pass: the consultation's slot began `starts_ago` and ends `ends_in` from now."""
    now = dt.datetime.now(dt.UTC)
    async with session_maker() as db:
        await db.execute(update(Consultation).where(Consultation.id == UUID(visit["id"]))
                         .values(starts_at=now - starts_ago, ends_at=now + ends_in))
        await db.commit()


async def updates(session_maker: Maker, visit: dict[str, Any]) -> list[dict[str, Any]]:
    """The consultation.updated events staged for this consultation, oldest first."""
    async with session_maker() as db:
        rows = (await db.scalars(select(OutboxEvent).where(OutboxEvent.aggregate_id == UUID(visit["id"]),
                                                           OutboxEvent.type == "consultation.updated")
                                 .order_by(OutboxEvent.created_at, OutboxEvent.id))).all()
    return [{"recipients": r.recipients, **r.payload} for r in rows]


async def payments(session_maker: Maker, visit: dict[str, Any]) -> list[tuple[str, str, str]]:
    async with session_maker() as db:
        rows = (await db.scalars(select(Payment).where(Payment.consultation_id == UUID(visit["id"]))
                                 .order_by(Payment.reference))).all()
    return [(r.reference, str(r.amount), r.method) for r in rows]


async def add_child(client: AsyncTestClient[Any], guardian: Session) -> dict[str, Any]:
    answer = await client.post("/api/v1/me/dependents", headers=guardian.headers, json=CHILD)
    assert answer.status_code == 201, answer.text
    child: dict[str, Any] = answer.json()
    return child


def ref() -> str:
    return f"pay-{secrets.token_hex(8)}"


PAYMENT = {"amount": "3000.00", "method": "card"}


# --- booking and confirmation ---------------------------------------------------------------------


async def test_first_booking_waits_and_only_the_front_desk_confirms(
    client: AsyncTestClient[Any], patient: Session, admin: Session, staff: Callable[..., Any],
    specialist: Callable[..., Any], service: Callable[..., Any],
    login: Callable[[str], Any], new_phone: Callable[[], str], session_maker: Maker, visit_until: Callable[..., Any],
) -> None:
    doctor = await specialist()
    other_doctor = await specialist()
    svc = await service()
    registrar, methodist = await staff("registrar"), await staff("methodist")
    stranger = await login(new_phone())
    visit = await visit_until(patient, doctor, svc, "booked", nth=1)
    assert visit["status"] == "pending_confirmation"
    assert (visit["patient_id"], visit["specialist_id"], visit["service_id"]) == (
        str(patient.id), str(doctor.id), svc["id"])
    assert visit["paid"] is False
    assert visit["format"] == "in_person"

    for intruder in (patient, doctor, other_doctor, methodist):  # the route is the front desk's only
        refused(await act(client, intruder, visit, "confirm"), 403)
    refused(await act(client, stranger, visit, "confirm"), 403)
    for outsider in (stranger, other_doctor, methodist):  # who has no part in it does not even see it
        refused(await client.get(f"/api/v1/consultations/{visit['id']}", headers=outsider.headers), 404)
    assert (await client.get(f"/api/v1/consultations/{visit['id']}", headers=patient.headers)).json()[
        "status"] == "pending_confirmation"

    done = await act(client, registrar, visit, "confirm")
    assert done.status_code == 200, done.text
    assert done.json()["status"] == "confirmed"
    assert done.json()["id"] == visit["id"]
    refused(await act(client, registrar, visit, "confirm"), 409, "transition_not_allowed")
    assert (await act(client, admin, visit, "confirm")).json()["extra"]["status"] == "confirmed"
    for who in (patient, doctor, registrar, admin):
        seen = await client.get(f"/api/v1/consultations/{visit['id']}", headers=who.headers)
        assert seen.status_code == 200, who
        assert seen.json()["status"] == "confirmed"

    # still no completed visit: waits again (an hour on: one place at a time)
    second = await visit_until(patient, other_doctor, svc, "booked", nth=2)
    assert second["status"] == "pending_confirmation"
    by_admin = await act(client, admin, second, "confirm")
    assert by_admin.status_code == 200, by_admin.text
    assert by_admin.json()["status"] == "confirmed"
    assert [e["change"] for e in await updates(session_maker, visit)] == ["booked", "confirm"]


async def test_after_a_completed_visit_a_booking_is_confirmed_at_once(
    patient: Session, specialist: Callable[..., Any], service: Callable[..., Any], visit_until: Callable[..., Any],
) -> None:
    doctor = await specialist()
    svc = await service()
    done = await visit_until(patient, doctor, svc, "completed", nth=1)
    assert done["status"] == "completed"
    again = await visit_until(patient, doctor, svc, "booked", nth=2)
    assert again["status"] == "confirmed"
    elsewhere = await visit_until(patient, await specialist(), svc, "booked", nth=1)
    assert elsewhere["status"] == "confirmed"


async def test_a_guardian_books_and_acts_for_a_dependent(
    client: AsyncTestClient[Any], patient: Session, staff: Callable[..., Any], specialist: Callable[..., Any],
    service: Callable[..., Any], book: Callable[..., Any],
    login: Callable[[str], Any], new_phone: Callable[[], str], visit_until: Callable[..., Any],
) -> None:
    doctor = await specialist("doctor", ["pediatrics", "endocrinology"])
    svc = await service("pediatrics")
    registrar = await staff("registrar")
    # the guardian's own history (an adult's visit) is not the child's
    await visit_until(patient, doctor, await service("endocrinology"), "completed", nth=1)
    child = await add_child(client, patient)
    visit = await visit_until(patient, doctor, svc, "booked", patient_id=child["id"], nth=1)
    assert visit["patient_id"] == child["id"]
    assert visit["status"] == "pending_confirmation"
    stranger = await login(new_phone())
    refused(await book(stranger, doctor, svc, nth=1, patient_id=child["id"]), 404)
    refused(await act(client, stranger, visit, "cancel"), 404)
    refused(await act(client, stranger, visit, "pay", **PAYMENT, reference=ref()), 404)

    confirm = await act(client, registrar, visit, "confirm")
    assert confirm.json()["status"] == "confirmed"
    refused(await act(client, patient, visit, "pay", **PAYMENT, reference=ref()), 403, "not_allowed")  # online
    paid = await act(client, registrar, visit, "pay", **PAYMENT, reference=ref())
    assert paid.status_code == 200, paid.text
    assert paid.json()["paid"] is True
    listed = (await client.get("/api/v1/consultations", headers=patient.headers)).json()["items"]
    assert visit["id"] in {v["id"] for v in listed}
    cancelled = await act(client, patient, visit, "cancel", reason="the child is ill")
    assert cancelled.status_code == 200, cancelled.text
    assert cancelled.json()["status"] == "cancelled"


# --- start and complete ---------------------------------------------------------------------------


async def test_the_own_specialist_starts_early_and_completes_after_start(
    client: AsyncTestClient[Any], patient: Session, admin: Session, staff: Callable[..., Any],
    specialist: Callable[..., Any], service: Callable[..., Any],
    session_maker: Maker, visit_until: Callable[..., Any],
) -> None:
    doctor = await specialist()
    other_doctor = await specialist()
    svc = await service()
    registrar, methodist = await staff("registrar"), await staff("methodist")
    await visit_until(patient, other_doctor, svc, "completed", nth=1)  # other_doctor is in care of this patient too
    visit = await visit_until(patient, doctor, svc, nth=4)  # two hours ahead at least
    assert dt.datetime.fromisoformat(visit["starts_at"]) > dt.datetime.now(dt.UTC) + dt.timedelta(hours=1)

    refused(await act(client, doctor, visit, "complete"), 409, "transition_not_allowed")  # not started yet
    for who in (patient, registrar, admin, methodist):  # not a specialist's route
        refused(await act(client, who, visit, "start"), 403)
        refused(await act(client, who, visit, "complete"), 403)
    refused(await act(client, other_doctor, visit, "start"), 404)  # another doctor's calendar is not theirs

    started = await act(client, doctor, visit, "start")  # long before the slot: taking a patient early
    assert started.status_code == 200, started.text
    assert started.json()["status"] == "in_progress"
    refused(await act(client, doctor, visit, "start"), 409, "transition_not_allowed")
    refused(await act(client, other_doctor, visit, "complete"), 404)
    completed = await act(client, doctor, visit, "complete")
    assert completed.status_code == 200, completed.text
    assert completed.json()["status"] == "completed"
    again = await act(client, doctor, visit, "complete")
    refused(again, 409, "transition_not_allowed")
    assert again.json()["extra"]["status"] == "completed"
    refused(await act(client, doctor, visit, "start"), 409, "transition_not_allowed")
    events = await updates(session_maker, visit)
    assert [(e["change"], e["status"]) for e in events] == [  # a repeat patient: confirmed at booking
        ("booked", "confirmed"), ("start", "in_progress"), ("complete", "completed")]
    assert all(e["recipients"] == [str(patient.id), str(doctor.id)] for e in events)
    assert all(e["consultation_id"] == visit["id"] for e in events)


async def test_start_needs_a_confirmed_visit_whose_slot_has_not_ended(
    client: AsyncTestClient[Any], patient: Session, specialist: Callable[..., Any],
    service: Callable[..., Any], session_maker: Maker, visit_until: Callable[..., Any],
) -> None:
    doctor = await specialist()
    svc = await service()
    pending = await visit_until(patient, doctor, svc, "booked", nth=1)
    answer = await act(client, doctor, pending, "start")
    refused(answer, 409, "transition_not_allowed")
    assert answer.json()["extra"]["status"] == "pending_confirmation"

    late = await visit_until(patient, doctor, svc, nth=1)
    await move_start(session_maker, late, starts_ago=dt.timedelta(minutes=10), ends_in=dt.timedelta(minutes=20))
    ok = await act(client, doctor, late, "start")  # late but within the slot
    assert ok.status_code == 200, ok.text
    assert ok.json()["status"] == "in_progress"

    over = await visit_until(patient, doctor, svc, nth=1)
    await move_start(session_maker, over, starts_ago=dt.timedelta(minutes=40), ends_in=-dt.timedelta(minutes=10))
    refused(await act(client, doctor, over, "start"), 409, "slot_over")
    assert (await client.get(f"/api/v1/consultations/{over['id']}", headers=doctor.headers)).json()[
        "status"] == "confirmed"
    assert [e["change"] for e in await updates(session_maker, over)] == ["booked", "confirm"]  # refusals stage none


# --- cancel ---------------------------------------------------------------------------------------


async def test_the_patient_cancels_before_start_and_the_slot_is_free_again(
    client: AsyncTestClient[Any], patient: Session, staff: Callable[..., Any], specialist: Callable[..., Any],
    service: Callable[..., Any], login: Callable[[str], Any],
    new_phone: Callable[[], str], session_maker: Maker, visit_until: Callable[..., Any],
) -> None:
    doctor = await specialist()
    other_doctor = await specialist()
    svc = await service()
    methodist = await staff("methodist")
    stranger = await login(new_phone())
    visit = await visit_until(patient, doctor, svc, "booked", nth=1)
    assert visit["slot_id"] not in {s["id"] for s in await free_slots(client, patient, doctor.id)}
    refused(await act(client, stranger, visit, "cancel"), 404)
    refused(await act(client, doctor, visit, "cancel"), 403)  # specialists do not cancel through this route
    refused(await act(client, other_doctor, visit, "cancel"), 403)
    refused(await act(client, methodist, visit, "cancel"), 403)

    cancelled = await act(client, patient, visit, "cancel", reason="changed my plans")
    assert cancelled.status_code == 200, cancelled.text
    assert cancelled.json()["status"] == "cancelled"
    assert visit["slot_id"] in {s["id"] for s in await free_slots(client, stranger, doctor.id)}
    async with session_maker() as db:
        assert await db.scalar(select(Consultation.cancel_reason).where(
            Consultation.id == UUID(visit["id"]))) == "changed my plans"
    again = await act(client, patient, visit, "cancel")
    refused(again, 409, "transition_not_allowed")
    assert again.json()["extra"]["status"] == "cancelled"
    refused(await act(client, doctor, visit, "start"), 409, "transition_not_allowed")

    rebooked = await client.post("/api/v1/consultations", headers=stranger.headers, json={
        "slot_id": visit["slot_id"], "service_id": svc["id"], "format": "in_person"})
    assert rebooked.status_code == 201, rebooked.text
    assert [(e["change"], e["status"]) for e in await updates(session_maker, visit)] == [
        ("booked", "pending_confirmation"), ("cancel", "cancelled")]


async def test_the_front_desk_cancels_and_nobody_cancels_after_start(
    client: AsyncTestClient[Any], patient: Session, admin: Session, staff: Callable[..., Any],
    specialist: Callable[..., Any], service: Callable[..., Any], session_maker: Maker, visit_until: Callable[..., Any],
) -> None:
    doctor = await specialist()
    svc = await service()
    registrar = await staff("registrar")
    by_registrar = await visit_until(patient, doctor, svc, nth=1)
    answer = await act(client, registrar, by_registrar, "cancel")
    assert answer.status_code == 200, answer.text
    assert answer.json()["status"] == "cancelled"
    assert by_registrar["slot_id"] in {s["id"] for s in await free_slots(client, patient, doctor.id)}
    by_admin = await visit_until(patient, doctor, svc, "booked", nth=2)
    assert (await act(client, admin, by_admin, "cancel")).json()["status"] == "cancelled"

    running = await visit_until(patient, doctor, svc, nth=1)
    assert (await act(client, doctor, running, "start")).status_code == 200
    for who in (patient, registrar, admin):
        answer = await act(client, who, running, "cancel")
        refused(answer, 409, "transition_not_allowed")
        assert answer.json()["extra"]["status"] == "in_progress"

    begun = await visit_until(patient, doctor, svc, nth=1)
    await move_start(session_maker, begun, starts_ago=dt.timedelta(minutes=5), ends_in=dt.timedelta(minutes=25))
    for who in (patient, registrar):
        refused(await act(client, who, begun, "cancel"), 409, "already_started")
    assert begun["slot_id"] not in {s["id"] for s in await free_slots(client, patient, doctor.id)}
    assert [e["change"] for e in await updates(session_maker, begun)] == ["booked", "confirm"]


# --- no-show --------------------------------------------------------------------------------------


async def test_no_show_only_once_the_slot_has_begun(
    client: AsyncTestClient[Any], patient: Session, admin: Session, staff: Callable[..., Any],
    specialist: Callable[..., Any], service: Callable[..., Any],
    login: Callable[[str], Any], new_phone: Callable[[], str], session_maker: Maker, visit_until: Callable[..., Any],
) -> None:
    doctor = await specialist()
    other_doctor = await specialist()
    svc = await service()
    registrar, methodist = await staff("registrar"), await staff("methodist")
    stranger = await login(new_phone())
    visit = await visit_until(patient, doctor, svc, nth=1)
    for who in (doctor, registrar, admin):
        refused(await act(client, who, visit, "no-show"), 409, "not_started_yet")
    for who in (patient, stranger, methodist):
        refused(await act(client, who, visit, "no-show"), 403)
    refused(await act(client, other_doctor, visit, "no-show"), 404)

    await move_start(session_maker, visit, starts_ago=dt.timedelta(minutes=15), ends_in=dt.timedelta(minutes=15))
    refused(await act(client, other_doctor, visit, "no-show"), 404)
    marked = await act(client, doctor, visit, "no-show")
    assert marked.status_code == 200, marked.text
    assert marked.json()["status"] == "no_show"
    refused(await act(client, registrar, visit, "no-show"), 409, "transition_not_allowed")
    refused(await act(client, doctor, visit, "start"), 409, "transition_not_allowed")
    refused(await act(client, registrar, visit, "pay", **PAYMENT, reference=ref()), 409, "transition_not_allowed")
    assert [(e["change"], e["status"]) for e in await updates(session_maker, visit)] == [
        ("booked", "pending_confirmation"), ("confirm", "confirmed"), ("no_show", "no_show")]

    by_desk = await visit_until(patient, doctor, svc, nth=1)
    await move_start(session_maker, by_desk, starts_ago=dt.timedelta(minutes=1), ends_in=dt.timedelta(minutes=29))
    assert (await act(client, registrar, by_desk, "no-show")).json()["status"] == "no_show"

    pending = await visit_until(patient, doctor, svc, "booked", nth=1)
    await move_start(session_maker, pending, starts_ago=dt.timedelta(minutes=1), ends_in=dt.timedelta(minutes=29))
    refused(await act(client, doctor, pending, "no-show"), 409, "transition_not_allowed")

    running = await visit_until(patient, doctor, svc, nth=1)
    assert (await act(client, doctor, running, "start")).status_code == 200
    await move_start(session_maker, running, starts_ago=dt.timedelta(minutes=1), ends_in=dt.timedelta(minutes=29))
    refused(await act(client, doctor, running, "no-show"), 409, "transition_not_allowed")


# --- payments -------------------------------------------------------------------------------------


async def test_payment_is_idempotent_by_reference(
    client: AsyncTestClient[Any], patient: Session, staff: Callable[..., Any], specialist: Callable[..., Any],
    service: Callable[..., Any], login: Callable[[str], Any],
    new_phone: Callable[[], str], session_maker: Maker, visit_until: Callable[..., Any],
) -> None:
    doctor = await specialist()
    svc = await service()
    registrar, methodist = await staff("registrar"), await staff("methodist")
    stranger = await login(new_phone())
    visit = await visit_until(patient, doctor, svc, nth=1)
    reference = ref()
    for who in (doctor, methodist):
        refused(await act(client, who, visit, "pay", **PAYMENT, reference=reference), 403)
    refused(await act(client, patient, visit, "pay", **PAYMENT, reference=reference), 403, "not_allowed")
    refused(await act(client, stranger, visit, "pay", **PAYMENT, reference=reference), 404)
    assert await payments(session_maker, visit) == []

    first = await act(client, registrar, visit, "pay", **PAYMENT, reference=reference)
    assert first.status_code == 200, first.text
    assert first.json()["paid"] is True
    assert first.json()["status"] == "confirmed"
    second = await act(client, registrar, visit, "pay", **PAYMENT, reference=reference)
    assert second.status_code == 200, second.text
    assert second.json() == first.json()
    assert await payments(session_maker, visit) == [(reference, "3000.00", "card")]
    changed = await act(client, registrar, visit, "pay", amount="3000.00", method="cash", reference=reference)
    refused(changed, 409, "payment_reference_used")  # a replay must be the same payment, not another one
    refused(await act(client, registrar, visit, "pay", **PAYMENT, reference=ref()), 409, "already_paid")
    assert await payments(session_maker, visit) == [(reference, "3000.00", "card")]
    assert [e["change"] for e in await updates(session_maker, visit)] == ["booked", "confirm", "paid"]

    other = await visit_until(patient, doctor, svc, nth=1)
    reused = await act(client, registrar, other, "pay", **PAYMENT, reference=reference)
    refused(reused, 409, "payment_reference_used")
    assert await payments(session_maker, other) == []
    assert (await client.get(f"/api/v1/consultations/{other['id']}", headers=patient.headers)).json()[
        "paid"] is False

    desk_reference = ref()
    for _ in range(2):
        by_desk = await act(client, registrar, other, "pay", method="cash", reference=desk_reference)  # the price
        assert by_desk.status_code == 200, by_desk.text
        assert by_desk.json()["paid"] is True
    assert await payments(session_maker, other) == [(desk_reference, "3000.00", "cash")]


async def test_a_payment_amount_must_be_positive_with_kopecks_at_most(
    client: AsyncTestClient[Any], patient: Session, staff: Callable[..., Any], specialist: Callable[..., Any],
    service: Callable[..., Any], session_maker: Maker, visit_until: Callable[..., Any],
) -> None:
    doctor = await specialist()
    svc = await service()
    registrar = await staff("registrar")
    visit = await visit_until(patient, doctor, svc, nth=1)
    for amount in ("0", "0.00", "1.234", "-100.00", "10000000.01"):
        answer = await act(client, registrar, visit, "pay", amount=amount, method="card", reference=ref())
        refused(answer, 422, "amount_invalid")
    for bad in ({"amount": "lots", "method": "card", "reference": ref()},
                {"amount": "100.00", "method": "barter", "reference": ref()},
                {"amount": "100.00", "method": "card", "reference": ""},
                {"amount": "100.00", "method": "card"}):
        refused(await act(client, registrar, visit, "pay", **bad), 422, "invalid_input")
    assert await payments(session_maker, visit) == []
    assert (await client.get(f"/api/v1/consultations/{visit['id']}", headers=patient.headers)).json()[
        "paid"] is False

    cancelled = await visit_until(patient, doctor, svc, nth=1)
    assert (await act(client, patient, cancelled, "cancel")).status_code == 200
    refused(await act(client, registrar, cancelled, "pay", **PAYMENT, reference=ref()), 409,
            "transition_not_allowed")
    async with session_maker() as db:
        assert await db.scalar(select(func.count()).select_from(Payment).where(
            Payment.consultation_id == UUID(cancelled["id"]))) == 0
