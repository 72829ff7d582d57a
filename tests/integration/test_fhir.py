"""The FHIR R4 read API (/fhir/R4): every resource and Bundle it answers validates as FHIR (fhir.resources,
R4B models: R4's structure for every resource served here), answers are application/fhir+json, refusals are
OperationOutcomes with the REST API's statuses, the REST masks hold (a psychologist never sees a doctor's
document, a pseudonymous card has no name), staff reads are audited as the REST reads are, and searches page."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit
from uuid import UUID

import msgspec
import pytest
from fhir.resources.R4B import get_fhir_model_class
from litestar.testing import AsyncTestClient
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.audit.service import AuditLog
from app.fhir.capability import SUPPORTED
from app.settings import Settings
from tests.conftest import Session, running
from tests.integration.documents_world import Clinic

FHIR_JSON = "application/fhir+json"
BASE = "/fhir/R4"


@dataclass
class World:
    people: dict[str, Session]
    visits: dict[str, dict[str, Any]]
    docs: dict[str, UUID]
    conversation_id: UUID

    def __getitem__(self, name: str) -> Session:
        return self.people[name]


@pytest.fixture(scope="module")
async def world(client: AsyncTestClient[Any], test_settings: Settings,
                session_maker: async_sessionmaker[AsyncSession]) -> World:
    clinic = Clinic(client, test_settings, session_maker)
    await clinic.start()
    assert clinic.admin is not None
    assert clinic.registrar is not None
    p = {"patient": await clinic.patient(), "other_patient": await clinic.patient(),
         "doctor": await clinic.specialist("doctor", "endocrinology"),
         "psychologist": await clinic.specialist("psychologist", "psychology"),
         "registrar": clinic.registrar, "admin": clinic.admin}
    endo, psych = await clinic.service("endocrinology"), await clinic.service("psychology")
    patient, doctor = p["patient"], p["doctor"]
    card = await client.patch("/api/v1/me", headers=patient.headers,
                              json={"full_name": "Anna Petrova", "birth_date": "1990-04-02", "sex": "female"})
    assert card.status_code == 200, card.text
    visits = {"doctor": await clinic.visit(patient, doctor, endo, 1),
              "psychologist": await clinic.visit(patient, p["psychologist"], psych, 3),
              "doctor_later": await clinic.visit(patient, doctor, endo, 6)}
    for command in ("start", "complete"):  # the first visit happened: an Encounter
        answer = await client.post(f"/api/v1/consultations/{visits['doctor']['id']}/{command}",
                                   headers=doctor.headers)
        assert answer.status_code == 200, answer.text
    visits["doctor"] = answer.json()
    conversation_id = UUID(visits["doctor"]["conversation_id"])
    for who, text in ((patient, "Good morning"), (doctor, "Hello, how are you feeling?"), (patient, "Better")):
        sent = await client.post(f"/api/v1/chats/{conversation_id}/messages", headers=who.headers,
                                 json={"client_id": f"m-{text[:4]}", "text": text})
        assert sent.status_code in (200, 201), sent.text
    docs = {
        "analysis": await clinic.document(patient.id, patient, "patient", "analysis"),
        "doctor_conclusion": await clinic.document(patient.id, doctor, "doctor", "conclusion"),
        "psychologist_note": await clinic.document(patient.id, p["psychologist"], "psychologist", "other"),
        "other_patients": await clinic.document(p["other_patient"].id, p["other_patient"], "patient", "image"),
    }
    return World(p, visits, docs, conversation_id)


# --- helpers -----------------------------------------------------------------------------------------

def valid(resource: dict[str, Any]) -> dict[str, Any]:
    """The resource parses as its FHIR model; a Bundle's entries each as theirs too."""
    get_fhir_model_class(resource["resourceType"]).model_validate(resource)
    for entry in resource.get("entry", []):
        valid(entry["resource"])
    return resource


async def fhir_get(client: AsyncTestClient[Any], who: Session | None, path: str, expect: int = 200,
                   request_id: str | None = None, **params: Any) -> dict[str, Any]:
    """GET a FHIR path (or a link the server gave) with these search parameters; the answer validated."""
    headers = dict(who.headers) if who is not None else {}
    if request_id is not None:
        headers["X-Request-ID"] = request_id
    # a link the server gave carries its own query (httpx would replace it with an empty `params`)
    answer = await client.get(path if path.startswith("http") else BASE + path, headers=headers,
                              params=params or None)
    assert answer.status_code == expect, answer.text
    assert answer.headers["content-type"].split(";")[0] == FHIR_JSON
    body: dict[str, Any] = answer.json()
    valid(body)
    if expect >= 400:
        assert body["resourceType"] == "OperationOutcome"
    return body


def ids(bundle: dict[str, Any]) -> set[str]:
    assert bundle["resourceType"] == "Bundle"
    assert bundle["type"] == "searchset"
    return {e["resource"]["id"] for e in bundle.get("entry", [])}


async def audit_rows(client: AsyncTestClient[Any], admin: Session, request_id: str) -> list[dict[str, Any]]:
    audit: AuditLog = client.app.state.audit
    assert await asyncio.to_thread(client.blocking_portal.call, audit.flush)
    answer = await client.get("/api/v1/audit", headers=admin.headers, params={"limit": 200})
    assert answer.status_code == 200, answer.text
    return [r for r in answer.json()["items"] if r["request_id"] == request_id]


# --- the capability statement and refusals ------------------------------------------------------------

async def test_metadata_is_open_and_lists_exactly_what_is_served(client: AsyncTestClient[Any]) -> None:
    statement = await fhir_get(client, None, "/metadata")
    assert statement["resourceType"] == "CapabilityStatement"
    assert statement["fhirVersion"] == "4.0.1"
    served = {r["type"]: r for r in statement["rest"][0]["resource"]}
    assert set(served) == set(SUPPORTED)
    assert {i["code"] for i in served["Patient"]["interaction"]} == {"read"}
    assert {p["name"] for p in served["Appointment"]["searchParam"]} == {"patient", "date", "status"}


async def test_refusals_are_operation_outcomes_with_the_rest_statuses(client: AsyncTestClient[Any],
                                                                      world: World) -> None:
    patient = world["patient"]
    no_token = await fhir_get(client, None, "/Appointment", 401)
    assert no_token["issue"][0]["code"] == "login"
    await fhir_get(client, None, f"/Patient/{patient.id}", 401)
    assert (await fhir_get(client, patient, "/Appointment", 400, _count="0"))["issue"][0]["code"] == "invalid"
    await fhir_get(client, patient, "/Appointment", 400, _count="101")
    await fhir_get(client, patient, "/Appointment", 400, date="ne2026-01-01")
    await fhir_get(client, patient, "/Appointment", 400, date="yesterday")
    await fhir_get(client, patient, "/Appointment", 400, status="maybe")
    await fhir_get(client, patient, "/Appointment", 400, practitioner="x")  # not supported: refused, not ignored
    await fhir_get(client, patient, "/Appointment", 400, _cursor="not-ours")
    await fhir_get(client, patient, "/Appointment/not-an-id", 404)
    await fhir_get(client, patient, f"/Appointment/{world.docs['analysis']}", 404)  # no such appointment
    await fhir_get(client, patient, "/Observation", 404)  # not a resource this server has
    await fhir_get(client, patient, "/Patient", 404)  # Patient is read by id only


# --- patients and the card mask -------------------------------------------------------------------------

async def test_a_patient_is_shown_through_the_card_mask_and_a_stranger_gets_404_as_in_rest(
        client: AsyncTestClient[Any], world: World) -> None:
    patient, other = world["patient"], world["other_patient"]
    own = await fhir_get(client, patient, f"/Patient/{patient.id}")
    assert own["telecom"][0]["value"] == patient.phone
    by_doctor = await fhir_get(client, world["doctor"], f"/Patient/{patient.id}")
    assert by_doctor["name"] == [{"use": "official", "text": "Anna Petrova"}]
    assert "telecom" in by_doctor
    assert (by_doctor["gender"], by_doctor["birthDate"]) == ("female", "1990-04-02")
    by_psychologist = await fhir_get(client, world["psychologist"], f"/Patient/{patient.id}")
    rest = (await client.get(f"/api/v1/patients/{patient.id}", headers=world["psychologist"].headers)).json()
    assert rest["full_name"] is None
    assert rest["phone"] is None
    assert by_psychologist["name"] == [{"use": "anonymous", "text": "A.P."}] == [  # ... applies here
        {"use": "anonymous", "text": rest["initials"]}]
    assert not {"telecom", "birthDate", "gender"} & set(by_psychologist)
    by_registrar = await fhir_get(client, world["registrar"], f"/Patient/{patient.id}")
    assert "gender" not in by_registrar  # nothing medical for the front desk
    # another patient's card: 404 here as in REST, not 403
    assert (await client.get(f"/api/v1/patients/{patient.id}", headers=other.headers)).status_code == 404
    await fhir_get(client, other, f"/Patient/{patient.id}", 404)


async def test_staff_reads_are_audited_as_the_rest_reads_are(client: AsyncTestClient[Any], world: World) -> None:
    patient, doctor, admin = world["patient"], world["doctor"], world["admin"]
    await fhir_get(client, doctor, f"/Patient/{patient.id}", request_id="fhir-card")
    await fhir_get(client, doctor, f"/DocumentReference/{world.docs['doctor_conclusion']}", request_id="fhir-doc")
    await fhir_get(client, doctor, "/DocumentReference", request_id="fhir-docs", patient=f"Patient/{patient.id}")
    await fhir_get(client, doctor, "/Communication", request_id="fhir-chat",
                   encounter=f"Encounter/{world.visits['doctor']['id']}")
    await fhir_get(client, patient, f"/Patient/{patient.id}", request_id="fhir-own")
    card = await audit_rows(client, admin, "fhir-card")
    assert [(r["action"], r["patient_id"], r["actor_id"]) for r in card] == [
        ("card.read", str(patient.id), str(doctor.id))]
    assert [(r["action"], r["target_id"]) for r in await audit_rows(client, admin, "fhir-doc")] == [
        ("document.read", str(world.docs["doctor_conclusion"]))]
    assert [(r["action"], r["patient_id"]) for r in await audit_rows(client, admin, "fhir-docs")] == [
        ("documents.list", str(patient.id))]
    assert [(r["action"], r["target_id"]) for r in await audit_rows(client, admin, "fhir-chat")] == [
        ("chat.read", str(world.conversation_id))]
    assert await audit_rows(client, admin, "fhir-own") == []  # a patient's own read records nothing


# --- documents and the document mask --------------------------------------------------------------------

async def test_documents_follow_the_document_mask(client: AsyncTestClient[Any], world: World) -> None:
    patient, docs = world["patient"], world.docs
    mine = f"Patient/{patient.id}"
    by_doctor = ids(await fhir_get(client, world["doctor"], "/DocumentReference", patient=mine))
    assert {str(docs["analysis"]), str(docs["doctor_conclusion"]), str(docs["psychologist_note"])} <= by_doctor
    by_psychologist = ids(await fhir_get(client, world["psychologist"], "/DocumentReference", patient=mine))
    assert str(docs["doctor_conclusion"]) not in by_psychologist  # medical secrecy
    assert {str(docs["analysis"]), str(docs["psychologist_note"])} <= by_psychologist
    await fhir_get(client, world["psychologist"], f"/DocumentReference/{docs['doctor_conclusion']}", 404)
    assert ids(await fhir_get(client, world["registrar"], "/DocumentReference", patient=mine)) == set()
    await fhir_get(client, world["other_patient"], f"/DocumentReference/{docs['analysis']}", 404)
    assert str(docs["analysis"]) not in ids(await fhir_get(client, world["other_patient"], "/DocumentReference"))
    one = await fhir_get(client, patient, f"/DocumentReference/{docs['analysis']}")
    attachment = one["content"][0]["attachment"]
    assert urlsplit(attachment["url"]).path == f"/api/v1/documents/{docs['analysis']}/download"
    assert (attachment["contentType"], attachment["size"], attachment["title"]) == (
        "application/pdf", 1234, "result.pdf")
    assert one["subject"] == {"reference": mine}
    assert one["status"] == "current"
    upcoming = await fhir_get(client, patient, "/DocumentReference", patient=mine, date="ge2100-01-01")
    assert upcoming["total"] == 0
    assert ids(upcoming) == set()
    hidden = await fhir_get(client, patient, "/DocumentReference", patient=mine, status="entered-in-error")
    assert ids(hidden) == set()


async def test_analyses_are_diagnostic_reports_under_the_same_mask(client: AsyncTestClient[Any],
                                                                   world: World) -> None:
    patient, docs = world["patient"], world.docs
    mine = f"Patient/{patient.id}"
    report = await fhir_get(client, patient, f"/DiagnosticReport/{docs['analysis']}")
    assert (report["status"], report["code"]["coding"][0]["code"]) == ("final", "analysis")
    assert report["category"][0]["coding"][0]["code"] == "LAB"
    assert report["subject"] == {"reference": mine}
    form = report["presentedForm"][0]
    assert urlsplit(form["url"]).path == f"/api/v1/documents/{docs['analysis']}/download"
    assert (form["contentType"], form["size"], form["title"]) == ("application/pdf", 1234, "result.pdf")
    # only analyses: another kind of document is no report, and a search finds analyses alone
    await fhir_get(client, patient, f"/DiagnosticReport/{docs['doctor_conclusion']}", 404)
    found = await fhir_get(client, world["doctor"], "/DiagnosticReport", patient=mine)
    assert ids(found) == {str(docs["analysis"])}
    assert found["total"] == 1
    assert ids(await fhir_get(client, world["doctor"], "/DiagnosticReport", patient=mine, status="final")) == {
        str(docs["analysis"])}
    assert ids(await fhir_get(client, world["doctor"], "/DiagnosticReport", patient=mine,
                              status="entered-in-error")) == set()
    await fhir_get(client, world["doctor"], "/DiagnosticReport", 400, patient=mine, status="preliminary")
    # the document mask: the back office and another patient see none of it
    assert ids(await fhir_get(client, world["registrar"], "/DiagnosticReport", patient=mine)) == set()
    await fhir_get(client, world["other_patient"], f"/DiagnosticReport/{docs['analysis']}", 404)
    assert ids(await fhir_get(client, world["other_patient"], "/DiagnosticReport")) == set()


# --- consultations: appointments and encounters -----------------------------------------------------

async def test_links_start_at_the_public_base_url_behind_a_proxy(test_settings: Settings, world: World) -> None:
    """PUBLIC_BASE_URL set (TLS ends at a proxy, which reaches the app over plain HTTP): every link an answer
    carries starts with it, not with the request's own scheme and host."""
    public = "https://clinic.example"
    patient = world["patient"]
    async with running(msgspec.structs.replace(test_settings, public_base_url=public + "/")) as behind_proxy:
        page = await fhir_get(behind_proxy, patient, "/Appointment", patient=f"Patient/{patient.id}", _count="1")
        assert page["link"]
        assert all(link["url"].startswith(f"{public}{BASE}/") for link in page["link"])
        assert page["entry"]
        assert all(e["fullUrl"].startswith(f"{public}{BASE}/") for e in page["entry"])
        created = await behind_proxy.post("/api/v1/documents", headers=patient.headers, json={
            "patient_id": str(patient.id), "kind": "analysis", "filename": "a.pdf",
            "content_type": "application/pdf", "size": 100})
        assert created.status_code == 201, created.text
        if not test_settings.s3_endpoint_url:  # the local store's signed URL is the app's own
            assert created.json()["upload"]["url"].startswith(f"{public}/")


async def test_appointments_search_by_patient_date_and_status_and_page(client: AsyncTestClient[Any],
                                                                      world: World) -> None:
    patient, visits = world["patient"], world.visits
    mine = f"Patient/{patient.id}"
    everything = await fhir_get(client, patient, "/Appointment", patient=mine, date="ge2026-01-01")
    assert ids(everything) == {str(v["id"]) for v in visits.values()}
    assert everything["total"] == 3
    booked = await fhir_get(client, patient, "/Appointment", patient=mine, status="booked")
    assert ids(booked) == {str(visits["psychologist"]["id"]), str(visits["doctor_later"]["id"])}
    fulfilled = await fhir_get(client, patient, "/Appointment", patient=mine, status="fulfilled")
    assert ids(fulfilled) == {str(visits["doctor"]["id"])}
    assert ids(await fhir_get(client, patient, "/Appointment", date="lt2026-01-01")) == set()
    # paging: one entry a page, following next links to the end
    seen: list[str] = []
    page = await fhir_get(client, patient, "/Appointment", patient=mine, _count="1")
    assert page["total"] == 3  # counted on the first page only
    while True:
        assert len(page["entry"]) == 1
        seen.append(page["entry"][0]["resource"]["id"])
        following = [link["url"] for link in page["link"] if link["relation"] == "next"]
        if not following:
            break
        page = await fhir_get(client, patient, following[0])
        assert "total" not in page
    assert sorted(seen) == sorted(str(v["id"]) for v in visits.values())
    assert len(seen) == 3
    starts = [(await fhir_get(client, patient, f"/Appointment/{i}"))["start"] for i in seen]
    assert starts == sorted(starts)
    # another patient searching for this one's appointments finds none of them; reading one is 404
    other = world["other_patient"]
    assert ids(await fhir_get(client, other, "/Appointment", patient=mine)) == set()
    await fhir_get(client, other, f"/Appointment/{visits['doctor']['id']}", 404)
    # a clinician sees their own consultations only; the front desk every one
    by_psychologist = ids(await fhir_get(client, world["psychologist"], "/Appointment", patient=mine))
    assert by_psychologist == {str(visits["psychologist"]["id"])}
    assert len(ids(await fhir_get(client, world["registrar"], "/Appointment", patient=mine))) == 3


async def test_a_visit_that_happened_is_an_encounter_with_its_chat(client: AsyncTestClient[Any],
                                                                   world: World) -> None:
    patient, doctor, visits = world["patient"], world["doctor"], world.visits
    done = await fhir_get(client, patient, f"/Encounter/{visits['doctor']['id']}")
    assert done["status"] == "finished"
    assert done["class"]["code"] == "AMB"
    assert done["subject"]["reference"] == f"Patient/{patient.id}"
    await fhir_get(client, patient, f"/Encounter/{visits['doctor_later']['id']}", 404)  # not begun: none
    found = await fhir_get(client, patient, "/Encounter", patient=f"Patient/{patient.id}")
    assert ids(found) == {str(visits["doctor"]["id"])}
    chat = f"Encounter/{visits['doctor']['id']}"
    messages = await fhir_get(client, patient, "/Communication", encounter=chat)
    texts = [e["resource"]["payload"][0]["contentString"] for e in messages["entry"]]
    assert texts == ["Better", "Hello, how are you feeling?", "Good morning"]
    assert messages["total"] == 3
    first = messages["entry"][1]["resource"]
    assert first["sender"] == {"reference": f"Practitioner/{doctor.id}"}
    paged = await fhir_get(client, patient, "/Communication", encounter=chat, _count="2")
    following = [link["url"] for link in paged["link"] if link["relation"] == "next"]
    rest = await fhir_get(client, patient, following[0])
    assert [e["resource"]["payload"][0]["contentString"] for e in rest["entry"]] == ["Good morning"]
    # the chat's people only: not another patient, not the front desk, not another clinician
    for outsider in ("other_patient", "registrar", "psychologist"):
        assert ids(await fhir_get(client, world[outsider], "/Communication", encounter=chat)) == set()


# --- the catalogue: practitioners, roles, schedules, slots ----------------------------------------------

async def test_practitioners_roles_schedules_and_free_slots(client: AsyncTestClient[Any], world: World) -> None:
    patient, doctor = world["patient"], world["doctor"]
    person = await fhir_get(client, patient, f"/Practitioner/{doctor.id}")
    assert person["name"] == [{"text": "Test doctor"}]
    role = await fhir_get(client, patient, f"/PractitionerRole/{doctor.id}")
    assert role["specialty"][0]["coding"][0] == {"system": "urn:clinic:specialty", "code": "endocrinology",
                                                 "display": "Endocrinology"}
    assert role["code"][0]["coding"][0]["code"] == "doctor"
    await fhir_get(client, patient, f"/Practitioner/{world['registrar'].id}", 404)  # not a specialist
    await fhir_get(client, patient, f"/Practitioner/{patient.id}", 404)
    roles = await fhir_get(client, patient, "/PractitionerRole", specialty="urn:clinic:specialty|psychology")
    assert str(world["psychologist"].id) in ids(roles)
    assert str(doctor.id) not in ids(roles)
    pages = await fhir_get(client, patient, "/Practitioner", _count="1")
    assert len(pages["entry"]) == 1
    assert any(link["relation"] == "next" for link in pages["link"])
    schedules = await fhir_get(client, patient, "/Schedule", actor=f"Practitioner/{doctor.id}")
    assert len(schedules["entry"]) == 1
    schedule = schedules["entry"][0]["resource"]
    assert schedule["actor"][0]["reference"] == f"Practitioner/{doctor.id}"
    await fhir_get(client, patient, f"/Schedule/{schedule['id']}")
    slots = await fhir_get(client, patient, "/Slot", schedule=f"Schedule/{schedule['id']}", _count="5")
    assert len(slots["entry"]) == 5
    assert slots["total"] > 5
    assert all(e["resource"]["status"] == "free" for e in slots["entry"])
    rest = (await client.get(f"/api/v1/specialists/{doctor.id}/slots", headers=patient.headers)).json()["items"]
    assert [e["resource"]["id"] for e in slots["entry"]] == [s["id"] for s in rest[:5]]
    booked = str(world.visits["doctor_later"]["slot_id"])
    assert booked not in ids(slots)  # a booked slot is not published
    assert ids(await fhir_get(client, patient, "/Slot", schedule=f"Schedule/{schedule['id']}",
                              status="busy")) == set()
    await fhir_get(client, patient, "/Slot", 400)  # a slot search names its schedule
    on = f"Schedule/{schedule['id']}"
    await fhir_get(client, patient, "/Slot", 400, schedule=on, status="bogus")  # a status FHIR does not know
    await fhir_get(client, patient, "/Slot", 400, schedule=on, start=["ge2030-01-01", "lt2031-01-01"])  # > 93 days


async def test_date_bounds_are_one_range_however_written_and_impossible_years_are_400(
        client: AsyncTestClient[Any], world: World) -> None:
    patient, visits = world["patient"], world.visits
    mine = f"Patient/{patient.id}"
    everything = {str(v["id"]) for v in visits.values()}
    # several lower and upper bounds, in any order: the narrowest range (and one statement shape for all)
    loose = await fhir_get(client, patient, "/Appointment", patient=mine,
                           date=["lt2099-01-01", "ge2000-01-01", "lt2098-06-01", "ge2026-01-01", "le2097-12-31"])
    assert ids(loose) == everything
    from app.fhir.queries import consultations_statement

    shapes = consultations_statement.cache_info().currsize
    for n in range(2, 12):  # more and more bounds, all the same range: no new statement
        dates = [f"ge20{10 + k:02d}-01-01" for k in range(n)] + ["lt2099-01-01"]
        assert ids(await fhir_get(client, patient, "/Appointment", patient=mine, date=dates)) == everything
    assert consultations_statement.cache_info().currsize <= shapes + 1
    for impossible in ("le9999-12-31", "9999-12", "9999-12-31T23:59:59.999999", "ge0001-01-01"):
        answer = await fhir_get(client, patient, "/Appointment", 400, patient=mine, date=impossible)
        assert answer["resourceType"] == "OperationOutcome"
