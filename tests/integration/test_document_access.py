"""Who sees which document: the role x kind x author x relationship mask, through every way out (list, read,
download's check, inbox), and who may upload what."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from uuid import UUID

import pytest
from litestar.testing import AsyncTestClient
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.audit.models import audit_event
from app.errors import DomainError, NotVisible
from app.settings import Settings
from tests.conftest import Session, refused
from tests.integration.documents_world import Clinic


@dataclass
class World:
    clinic: Clinic
    people: dict[str, Session]
    docs: dict[str, UUID]


# Each viewer, and the documents of the world they see (the rules of DOMAIN.md, cell by cell).
SEES: dict[str, set[str]] = {
    "patient": {"analysis", "image_at_sonography", "doctor_conclusion", "psychologist_note", "sonographer_image",
                "pending_own"},  # all of their own, whoever wrote them; their own upload while pending too
    "guardian": {"dependent_analysis"},  # their dependent's
    "other_patient": {"other_image"},  # their own, nothing of anyone else
    "doctor": {"analysis", "image_at_sonography", "doctor_conclusion", "psychologist_note", "sonographer_image"},
    "doctor_not_in_care": set(),
    # the patient's uploads and psychologists' documents, never a doctor's (nor another clinician's)
    "psychologist": {"analysis", "image_at_sonography", "psychologist_note"},
    # their own, and what the patient brought to their own visit
    "sonographer": {"image_at_sonography", "sonographer_image"},
    "other_sonographer": set(),  # in care too, but the patient's upload was to another sonographer's visit
    "methodist": {"analysis", "dependent_analysis"},  # analyses in the inbox, nothing else
    "registrar": set(),
    "admin": set(),
}


@pytest.fixture(scope="module")
async def world(client: AsyncTestClient[Any], test_settings: Settings,
                session_maker: async_sessionmaker[AsyncSession]) -> World:
    clinic = Clinic(client, test_settings, session_maker)
    await clinic.start()
    assert clinic.admin is not None
    assert clinic.registrar is not None
    p = {"patient": await clinic.patient(), "guardian": await clinic.patient(),
         "other_patient": await clinic.patient(),
         "doctor": await clinic.specialist("doctor", "endocrinology"),
         "doctor_not_in_care": await clinic.specialist("doctor", "endocrinology"),
         "psychologist": await clinic.specialist("psychologist", "psychology"),
         "sonographer": await clinic.specialist("sonographer", "ultrasound"),
         "other_sonographer": await clinic.specialist("sonographer", "ultrasound"),
         "methodist": await clinic.staff("methodist"), "registrar": clinic.registrar, "admin": clinic.admin}
    endo, psych = await clinic.service("endocrinology"), await clinic.service("psychology")
    sono = await clinic.service("ultrasound", in_person_only=True, stage="single")
    patient = p["patient"]
    await clinic.visit(patient, p["doctor"], endo, 1)
    await clinic.visit(patient, p["psychologist"], psych, 3)
    sonography = await clinic.visit(patient, p["sonographer"], sono, 5)
    await clinic.visit(patient, p["other_sonographer"], sono, 7)
    dependent = await clinic.dependent(p["guardian"])
    docs = {
        "analysis": await clinic.document(patient.id, patient, "patient", "analysis", inbox_status="new"),
        "image_at_sonography": await clinic.document(patient.id, patient, "patient", "image",
                                                     consultation_id=sonography["id"]),
        "doctor_conclusion": await clinic.document(patient.id, p["doctor"], "doctor", "conclusion"),
        "psychologist_note": await clinic.document(patient.id, p["psychologist"], "psychologist", "other"),
        "sonographer_image": await clinic.document(patient.id, p["sonographer"], "sonographer", "image",
                                                   consultation_id=sonography["id"]),
        "pending_own": await clinic.document(patient.id, patient, "patient", "analysis", status="pending"),
        "dependent_analysis": await clinic.document(dependent, p["guardian"], "patient", "analysis",
                                                    inbox_status="new"),
        "other_image": await clinic.document(p["other_patient"].id, p["other_patient"], "patient", "image"),
    }
    return World(clinic, p, docs)


VIEWERS = sorted(SEES)


def names(world: World, ids: set[UUID]) -> set[str]:
    return {name for name, doc_id in world.docs.items() if doc_id in ids}


@pytest.mark.parametrize("viewer", VIEWERS)
async def test_a_list_shows_exactly_what_the_viewer_may_see(client: AsyncTestClient[Any], world: World,
                                                            viewer: str) -> None:
    seen: set[UUID] = set()
    cursor = None
    while True:  # small pages: the mask holds across pages, not only on the first
        answer = await client.get("/api/v1/documents", headers=world.people[viewer].headers,
                                  params={"limit": 2, **({"cursor": cursor} if cursor else {})})
        assert answer.status_code == 200, answer.text
        body = answer.json()
        seen |= {UUID(d["id"]) for d in body["items"]}
        cursor = body["next_cursor"]
        if cursor is None:
            break
    assert names(world, seen) == SEES[viewer]


@pytest.mark.parametrize("viewer", VIEWERS)
async def test_a_list_of_one_patient_and_kind_stays_within_the_mask(client: AsyncTestClient[Any], world: World,
                                                                    viewer: str) -> None:
    patient = world.people["patient"]
    answer = await client.get("/api/v1/documents", headers=world.people[viewer].headers,
                              params={"patient_id": str(patient.id), "kind": "analysis"})
    assert answer.status_code == 200, answer.text
    seen = names(world, {UUID(d["id"]) for d in answer.json()["items"]})
    assert seen == SEES[viewer] & {"analysis", "pending_own"}


@pytest.mark.parametrize("viewer", VIEWERS)
async def test_a_read_answers_what_the_viewer_may_see_and_404_for_the_rest(client: AsyncTestClient[Any],
                                                                           world: World, viewer: str) -> None:
    for name, doc_id in world.docs.items():
        answer = await client.get(f"/api/v1/documents/{doc_id}", headers=world.people[viewer].headers)
        if name in SEES[viewer]:
            assert answer.status_code == 200, (name, answer.text)
            assert answer.json()["id"] == str(doc_id)
        else:
            refused(answer, 404)  # hidden looks like absent: never 403


@pytest.mark.parametrize("viewer", VIEWERS)
async def test_a_download_follows_the_same_mask(client: AsyncTestClient[Any], world: World, viewer: str) -> None:
    for name, doc_id in world.docs.items():
        answer = await client.get(f"/api/v1/documents/{doc_id}/download", headers=world.people[viewer].headers,
                                  follow_redirects=False)
        if name not in SEES[viewer]:
            refused(answer, 404)
        elif name == "pending_own":
            refused(answer, 409, "not_ready")  # its author sees it, but there is nothing to download yet
        else:
            assert answer.status_code == 307, (name, answer.text)


@pytest.mark.parametrize("viewer", VIEWERS)
async def test_the_services_visibility_check_follows_the_same_mask(
        world: World, viewer: str, session_maker: async_sessionmaker[AsyncSession]) -> None:
    clinic = world.clinic
    async with session_maker() as session:
        documents = clinic.documents(session)
        for name, doc_id in world.docs.items():
            try:
                await documents.visible(clinic.viewer(world.people[viewer]), doc_id)
                shown = True
            except NotVisible:
                shown = False
            assert shown == (name in SEES[viewer]), name


INBOX_SEES = {"methodist": {"analysis", "dependent_analysis"}, "doctor": {"analysis"}, "psychologist": {"analysis"},
              "doctor_not_in_care": set()}


@pytest.mark.parametrize("viewer", VIEWERS)
async def test_the_inbox_is_the_workspace_of_methodists_doctors_and_psychologists(
        client: AsyncTestClient[Any], world: World, viewer: str) -> None:
    answer = await client.get("/api/v1/analyses/inbox", headers=world.people[viewer].headers,
                              params={"status": "new", "limit": 100})
    if viewer not in INBOX_SEES:
        refused(answer, 403)
        return
    assert answer.status_code == 200, answer.text
    items = answer.json()["items"]
    assert names(world, {UUID(d["id"]) for d in items}) == INBOX_SEES[viewer]
    assert all(d["kind"] == "analysis" and d["inbox_status"] == "new" for d in items)


async def test_staff_reads_are_audited_and_a_patients_own_are_not(
        client: AsyncTestClient[Any], world: World, session_maker: async_sessionmaker[AsyncSession]) -> None:
    patient, doctor = world.people["patient"], world.people["doctor"]
    doc_id = world.docs["analysis"]
    for who in (patient, doctor):
        assert (await client.get(f"/api/v1/documents/{doc_id}", headers=who.headers)).status_code == 200
        assert (await client.get("/api/v1/documents", headers=who.headers,
                                 params={"patient_id": str(patient.id)})).status_code == 200
    psychologist = world.people["psychologist"]
    assert (await client.get("/api/v1/analyses/inbox", headers=psychologist.headers)).status_code == 200
    await client.app.state.audit.flush()
    async with session_maker() as session:
        rows = (await session.execute(select(audit_event.c.actor_id, audit_event.c.action, audit_event.c.target_id)
                                      .where(audit_event.c.patient_id == patient.id))).all()
    assert (doctor.id, "document.read", doc_id) in rows
    assert (doctor.id, "documents.list", patient.id) in rows
    assert (psychologist.id, "documents.list", patient.id) in rows  # the inbox shows patients' documents too
    assert not [r for r in rows if r.actor_id == patient.id]


UPLOADS = [  # who, for whom, kind, with a consultation -> the author role, or the refusal's status
    ("patient", "patient", "analysis", "patient"), ("patient", "patient", "image", "patient"),
    ("patient", "patient", "conclusion", 403), ("patient", "other_patient", "analysis", 404),
    ("guardian", "dependent", "analysis", "patient"), ("other_patient", "dependent", "analysis", 404),
    ("doctor", "patient", "conclusion", "doctor"), ("doctor_not_in_care", "patient", "analysis", 404),
    ("psychologist", "patient", "other", "psychologist"), ("sonographer", "patient", "image", "sonographer"),
    ("sonographer", "other_patient", "image", 404),
    ("methodist", "patient", "analysis", 403), ("registrar", "patient", "other", 403),
    ("admin", "patient", "other", 403),
]


@pytest.mark.parametrize(("who", "whose", "kind", "outcome"), UPLOADS)
async def test_who_may_upload_what_for_whom(world: World, session_maker: async_sessionmaker[AsyncSession],
                                            who: str, whose: str, kind: str, outcome: str | int) -> None:
    clinic = world.clinic
    if whose == "dependent":
        async with session_maker() as session:
            patient_id = (await clinic.documents(session).visible(
                clinic.viewer(world.people["guardian"]), world.docs["dependent_analysis"])).patient_id
    else:
        patient_id = world.people[whose].id
    async with session_maker() as session:
        try:
            answer: str | int = await clinic.documents(session).may_upload(
                clinic.viewer(world.people[who]), patient_id, kind, None)
        except DomainError as exc:
            answer = exc.status_code
    assert answer == outcome


async def test_an_upload_to_a_consultation_must_be_the_patients_and_the_uploaders(
        world: World, session_maker: async_sessionmaker[AsyncSession]) -> None:
    clinic = world.clinic
    async with session_maker() as session:
        documents = clinic.documents(session)
        image = await documents.visible(clinic.viewer(world.people["patient"]), world.docs["image_at_sonography"])
        visit = image.consultation_id
        assert await documents.may_upload(clinic.viewer(world.people["patient"]), world.people["patient"].id,
                                          "image", visit) == "patient"
        assert await documents.may_upload(clinic.viewer(world.people["sonographer"]), world.people["patient"].id,
                                          "image", visit) == "sonographer"
        for who, whose in (("other_sonographer", "patient"), ("other_patient", "other_patient")):
            with pytest.raises(DomainError) as refusal:
                await documents.may_upload(clinic.viewer(world.people[who]), world.people[whose].id, "image", visit)
            assert refusal.value.extra["reason"] == "consultation_unknown"


async def test_a_forwarded_analysis_and_its_patients_card_reach_the_specialist(
        client: AsyncTestClient[Any], world: World, session_maker: async_sessionmaker[AsyncSession]) -> None:
    clinic = world.clinic
    patient, methodist = world.people["patient"], world.people["methodist"]
    specialist = await clinic.specialist("doctor", "endocrinology")  # no visit with the patient at all
    analysis = await clinic.document(patient.id, patient, "patient", "analysis", inbox_status="new")
    card = f"/api/v1/patients/{patient.id}"
    refused(await client.get(f"/api/v1/documents/{analysis}", headers=specialist.headers), 404)
    refused(await client.get(card, headers=specialist.headers), 404)
    methodist_card = await client.get(card, headers=methodist.headers)  # the inbox grants the identity only
    assert methodist_card.status_code == 200, methodist_card.text
    assert methodist_card.json()["phone"] is None
    forwarded = await client.post(f"/api/v1/documents/{analysis}/forward", headers=methodist.headers,
                                  json={"specialist_id": str(specialist.id), "note": "please look"})
    assert forwarded.status_code == 200, forwarded.text
    assert forwarded.json()["inbox_status"] == "forwarded"
    assert (await client.get(f"/api/v1/documents/{analysis}", headers=specialist.headers)).status_code == 200
    assert (await client.get(card, headers=specialist.headers)).status_code == 200
    listed = await client.get("/api/v1/analyses/inbox", headers=specialist.headers, params={"status": "forwarded"})
    assert [d["id"] for d in listed.json()["items"]] == [str(analysis)]
    # the other analyses of that patient stay hidden: the share is of one document
    refused(await client.get(f"/api/v1/documents/{world.docs['analysis']}", headers=specialist.headers), 404)
