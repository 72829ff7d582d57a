"""The methodists' inbox: analyses enter it when ready, are listed oldest first, forwarded and processed once."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any
from uuid import UUID

import pytest
from litestar.testing import AsyncTestClient
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.chat.models import UserEvent
from app.documents.models import Document, DocumentShare
from app.errors import DomainError
from app.outbox import OutboxEvent
from app.settings import Settings
from tests.conftest import refused, running
from tests.integration.documents_world import Clinic


@pytest.fixture(scope="module")
async def clinic(client: AsyncTestClient[Any], test_settings: Settings,
                 session_maker: async_sessionmaker[AsyncSession]) -> Clinic:
    made = Clinic(client, test_settings, session_maker)
    await made.start()
    return made


@pytest.fixture(scope="module")
async def second(test_settings: Settings) -> AsyncIterator[AsyncTestClient[Any]]:
    """Another instance of the API on the same database. The test client answers one request at a time, so these
    races show the loser's answer; real overlap is the service-level race below and tests/e2e/test_inbox_races.py."""
    async with running(test_settings) as other:
        yield other


async def events(sessions: async_sessionmaker[AsyncSession], user: UUID, type_: str) -> list[dict[str, Any]]:
    async with sessions() as session:
        return list((await session.scalars(select(UserEvent.data).where(
            UserEvent.recipient_id == user, UserEvent.type == type_).order_by(UserEvent.seq))).all())


async def make_ready(clinic: Clinic, document_id: UUID) -> Document:
    async with clinic.sessions() as session:
        document = await session.get(Document, document_id)
        assert document is not None
        await clinic.documents(session).became_ready(document)
        await session.commit()
        return document


async def test_an_analysis_the_patients_side_uploads_enters_the_inbox_when_ready(
        clinic: Clinic, session_maker: async_sessionmaker[AsyncSession]) -> None:
    patient, guardian = await clinic.patient(), await clinic.patient()
    dependent = await clinic.dependent(guardian)
    doctor = await clinic.specialist("doctor", "endocrinology")
    own = await clinic.document(patient.id, patient, "patient", "analysis", status="pending")
    wards = await clinic.document(dependent, guardian, "patient", "analysis", status="pending")
    image = await clinic.document(patient.id, patient, "patient", "image", status="pending")
    doctors = await clinic.document(patient.id, doctor, "doctor", "analysis", status="pending")
    ready = {d: await make_ready(clinic, d) for d in (own, wards, image, doctors)}
    assert all(d.status == "ready" and d.completed_at is not None for d in ready.values())
    assert [ready[d].inbox_status for d in (own, wards, image, doctors)] == ["new", "new", None, None]
    # the patient's side hears of it: the patient, and a dependent's guardian (a dependent has no login)
    assert [e["id"] for e in await events(session_maker, patient.id, "document.ready")] == [
        str(own), str(image), str(doctors)]
    assert [e["id"] for e in await events(session_maker, guardian.id, "document.ready")] == [str(wards)]
    assert await events(session_maker, doctor.id, "document.ready") == []


async def test_the_inbox_lists_oldest_first_page_by_page(client: AsyncTestClient[Any], clinic: Clinic) -> None:
    patient, methodist = await clinic.patient(), await clinic.staff("methodist")
    mine = [await clinic.document(patient.id, patient, "patient", "analysis", inbox_status="new")
            for _ in range(3)]
    seen: list[str] = []
    cursor = None
    while True:
        answer = await client.get("/api/v1/analyses/inbox", headers=methodist.headers,
                                  params={"limit": 2, **({"cursor": cursor} if cursor else {})})
        assert answer.status_code == 200, answer.text
        seen += [d["id"] for d in answer.json()["items"]]
        cursor = answer.json()["next_cursor"]
        if cursor is None:
            break
    assert [s for s in seen if UUID(s) in mine] == [str(m) for m in mine]
    assert len(seen) == len(set(seen))
    refused(await client.get("/api/v1/analyses/inbox", headers=methodist.headers, params={"status": "lost"}), 422)


async def test_a_forward_tells_the_specialist_live_and_through_the_outbox(
        client: AsyncTestClient[Any], clinic: Clinic, session_maker: async_sessionmaker[AsyncSession]) -> None:
    patient, methodist = await clinic.patient(), await clinic.staff("methodist")
    doctor = await clinic.specialist("doctor", "endocrinology")
    analysis = await clinic.document(patient.id, patient, "patient", "analysis", inbox_status="new")
    answer = await client.post(f"/api/v1/documents/{analysis}/forward", headers=methodist.headers,
                               json={"specialist_id": str(doctor.id)})
    assert answer.status_code == 200, answer.text
    notice = {"kind": "analysis_forwarded", "document_id": str(analysis)}
    assert await events(session_maker, doctor.id, "notice") == [notice]
    async with session_maker() as session:
        staged = (await session.scalars(select(OutboxEvent).where(OutboxEvent.aggregate_id == analysis))).all()
    assert [(o.type, o.recipients, o.payload) for o in staged] == [("notice", [str(doctor.id)], notice)]
    processed = await client.post(f"/api/v1/documents/{analysis}/processed", headers=methodist.headers)
    assert processed.json()["inbox_status"] == "processed"
    listed = await client.get("/api/v1/analyses/inbox", headers=methodist.headers, params={"status": "processed"})
    assert str(analysis) in [d["id"] for d in listed.json()["items"]]


async def test_a_forward_needs_an_active_specialist_and_a_new_analysis(
        client: AsyncTestClient[Any], clinic: Clinic) -> None:
    patient, methodist = await clinic.patient(), await clinic.staff("methodist")
    gone = await clinic.specialist("doctor", "endocrinology")
    assert clinic.admin is not None
    assert (await client.patch(f"/api/v1/staff/{gone.id}", headers=clinic.admin.headers,
                               json={"active": False})).status_code == 200
    analysis = await clinic.document(patient.id, patient, "patient", "analysis", inbox_status="new")
    url = f"/api/v1/documents/{analysis}/forward"
    for not_a_specialist in (methodist.id, patient.id, gone.id, UUID(int=7)):
        refused(await client.post(url, headers=methodist.headers, json={"specialist_id": str(not_a_specialist)}),
                422, "specialist_unknown")
    image = await clinic.document(patient.id, patient, "patient", "image")
    doctor = await clinic.specialist("doctor", "endocrinology")
    refused(await client.post(f"/api/v1/documents/{image}/forward", headers=methodist.headers,
                              json={"specialist_id": str(doctor.id)}), 404)  # not in the inbox: not theirs to see
    refused(await client.post(url, headers=patient.headers, json={"specialist_id": str(doctor.id)}), 403)
    assert (await client.post(f"/api/v1/documents/{analysis}/processed", headers=methodist.headers)).status_code == 200
    refused(await client.post(url, headers=methodist.headers, json={"specialist_id": str(doctor.id)}),
            409, "inbox_status_changed")


async def race(first: Any, second: Any) -> list[Any]:
    answers = await asyncio.gather(first, second)
    return sorted(answers, key=lambda a: a.status_code)


async def test_two_methodists_forwarding_one_analysis_one_wins(
        client: AsyncTestClient[Any], second: AsyncTestClient[Any], clinic: Clinic,
        session_maker: async_sessionmaker[AsyncSession]) -> None:
    patient = await clinic.patient()
    one, two = await clinic.staff("methodist"), await clinic.staff("methodist")
    doctor_a = await clinic.specialist("doctor", "endocrinology")
    doctor_b = await clinic.specialist("doctor", "endocrinology")
    for _ in range(3):
        analysis = await clinic.document(patient.id, patient, "patient", "analysis", inbox_status="new")
        url = f"/api/v1/documents/{analysis}/forward"
        won, lost = await race(client.post(url, headers=one.headers, json={"specialist_id": str(doctor_a.id)}),
                               second.post(url, headers=two.headers, json={"specialist_id": str(doctor_b.id)}))
        assert won.status_code == 200, won.text
        refused(lost, 409, "inbox_status_changed")
        async with session_maker() as session:
            shares = await session.scalar(select(func.count()).select_from(DocumentShare).where(
                DocumentShare.document_id == analysis))
        assert shares == 1


async def test_two_methodists_processing_one_analysis_one_wins(
        client: AsyncTestClient[Any], second: AsyncTestClient[Any], clinic: Clinic) -> None:
    patient = await clinic.patient()
    one, two = await clinic.staff("methodist"), await clinic.staff("methodist")
    for _ in range(3):
        analysis = await clinic.document(patient.id, patient, "patient", "analysis", inbox_status="new")
        url = f"/api/v1/documents/{analysis}/processed"
        won, lost = await race(client.post(url, headers=one.headers), second.post(url, headers=two.headers))
        assert won.status_code == 200, won.text
        assert won.json()["inbox_status"] == "processed"
        refused(lost, 409, "inbox_status_changed")


async def test_a_doctor_works_the_inbox_of_their_own_patients(client: AsyncTestClient[Any], clinic: Clinic) -> None:
    patient, stranger = await clinic.patient(), await clinic.patient()
    doctor = await clinic.specialist("doctor", "endocrinology")
    await clinic.visit(patient, doctor, await clinic.service("endocrinology"), 1)
    theirs = await clinic.document(patient.id, patient, "patient", "analysis", inbox_status="new")
    other = await clinic.document(stranger.id, stranger, "patient", "analysis", inbox_status="new")
    listed = await client.get("/api/v1/analyses/inbox", headers=doctor.headers, params={"limit": 100})
    assert [d["id"] for d in listed.json()["items"]] == [str(theirs)]
    refused(await client.post(f"/api/v1/documents/{other}/processed", headers=doctor.headers), 404)
    done = await client.post(f"/api/v1/documents/{theirs}/processed", headers=doctor.headers)
    assert done.status_code == 200, done.text



async def test_concurrent_moves_of_one_analysis_in_the_service_let_one_win(
        clinic: Clinic, session_maker: async_sessionmaker[AsyncSession]) -> None:
    """The same race below HTTP (the test client answers one request at a time): two transactions at once, each
    reading the analysis as new before either writes; the compare-and-set lets exactly one through."""
    patient = await clinic.patient()
    one, two = await clinic.staff("methodist"), await clinic.staff("methodist")
    doctor = await clinic.specialist("doctor", "endocrinology")

    async def move(who: Any, document_id: UUID, command: str) -> str:
        async with session_maker() as session:
            documents = clinic.documents(session)
            try:
                if command == "forward":
                    await documents.forward(clinic.viewer(who), document_id, doctor.id, None)
                else:
                    await documents.processed(clinic.viewer(who), document_id)
            except DomainError as exc:
                await session.rollback()
                return str(exc.extra["reason"])
            await session.commit()
            return "ok"

    for first, second in (("processed", "processed"), ("forward", "forward")):
        analysis = await clinic.document(patient.id, patient, "patient", "analysis", inbox_status="new")
        outcomes = await asyncio.gather(move(one, analysis, first), move(two, analysis, second))
        assert sorted(outcomes) == ["inbox_status_changed", "ok"], (first, second)
