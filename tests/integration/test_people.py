"""Profiles, dependents, staff, patient cards through the secrecy masks, devices."""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Callable
from typing import Any

import pytest
from litestar.testing import AsyncTestClient

from app.access import CARD_FIELDS, VISIBLE_BY_ROLE, Role
from tests.conftest import Session

CHILD = {"full_name": "Masha Testova", "birth_date": "2019-03-02", "relation": "child",
         "legal_basis": "birth certificate II-AB 123456"}


async def add_child(client: AsyncTestClient[Any], guardian: Session) -> dict[str, Any]:
    answer = await client.post("/api/v1/me/dependents", headers=guardian.headers, json=CHILD)
    assert answer.status_code == 201, answer.text
    body: dict[str, Any] = answer.json()
    return body


async def test_me_shows_the_account_and_its_dependents(client: AsyncTestClient[Any], patient: Session) -> None:
    child = await add_child(client, patient)
    me = (await client.get("/api/v1/me", headers=patient.headers)).json()
    assert me["id"] == str(patient.id)
    assert me["roles"] == ["patient"]
    assert me["dependents"] == [{**CHILD, "id": child["id"], "sex": None}]
    listed = (await client.get("/api/v1/me/dependents", headers=patient.headers)).json()
    assert listed == {"items": [{**CHILD, "id": child["id"], "sex": None}], "next_cursor": None}


async def test_patch_me_validates_each_field(client: AsyncTestClient[Any], patient: Session) -> None:
    ok = await client.patch("/api/v1/me", headers=patient.headers, json={
        "full_name": "  Olga   Ivanova ", "birth_date": "1990-01-31", "timezone": "Asia/Vladivostok",
        "questionnaire": {"allergies": "none", "pregnancies": 1, "smoker": False}})
    assert ok.status_code == 200, ok.text
    body = ok.json()
    assert (body["full_name"], body["timezone"], body["birth_date"]) == ("Olga Ivanova", "Asia/Vladivostok",
                                                                           "1990-01-31")
    assert body["questionnaire"]["pregnancies"] == 1
    for bad, reason in [({"timezone": "Mars/Olympus"}, "timezone_invalid"),
                        ({"birth_date": (dt.date.today() + dt.timedelta(days=1)).isoformat()}, "birth_date_invalid"),
                        ({"full_name": ""}, "invalid_input"),
                        ({"full_name": "\u0000\u0001"}, "name_invalid"),
                        ({"roles": ["admin"]}, "invalid_input"),
                        ({"questionnaire": {"x": {"nested": "object"}}}, "invalid_input")]:
        answer = await client.patch("/api/v1/me", headers=patient.headers, json=bad)
        assert answer.status_code == 422, bad
        assert answer.json()["extra"]["reason"] == reason, bad
    after = (await client.get("/api/v1/me", headers=patient.headers)).json()
    assert after["timezone"] == "Asia/Vladivostok"  # nothing half-written by the refused patches
    assert after["roles"] == ["patient"]


async def test_dependent_needs_a_valid_relation_and_legal_basis(
    client: AsyncTestClient[Any], patient: Session
) -> None:
    for bad in [{**CHILD, "relation": "neighbour"}, {**CHILD, "legal_basis": ""},
                {**CHILD, "birth_date": "2999-01-01"}, {k: v for k, v in CHILD.items() if k != "legal_basis"}]:
        answer = await client.post("/api/v1/me/dependents", headers=patient.headers, json=bad)
        assert answer.status_code == 422, bad
    assert (await client.get("/api/v1/me/dependents", headers=patient.headers)).json()["items"] == []


async def test_a_patient_cannot_read_another_patients_card(
    client: AsyncTestClient[Any], patient: Session, login: Callable[[str], Any], new_phone: Callable[[], str]
) -> None:
    stranger = await login(new_phone())
    child = await add_child(client, stranger)
    for target in (stranger.id, child["id"], uuid.uuid4()):
        answer = await client.get(f"/api/v1/patients/{target}", headers=patient.headers)
        assert answer.status_code == 404  # not 403: a stranger learns nothing about existence
    own = await client.get(f"/api/v1/patients/{patient.id}", headers=patient.headers)
    assert own.status_code == 200
    assert own.json()["phone"] == patient.phone


async def test_a_guardian_reads_their_dependent_but_not_someone_elses(
    client: AsyncTestClient[Any], patient: Session, login: Callable[[str], Any], new_phone: Callable[[], str]
) -> None:
    mine = await add_child(client, patient)
    card = await client.get(f"/api/v1/patients/{mine['id']}", headers=patient.headers)
    assert card.status_code == 200
    assert card.json()["full_name"] == CHILD["full_name"]
    assert card.json()["guardian_id"] == str(patient.id)
    other_parent = await login(new_phone())
    theirs = await add_child(client, other_parent)
    assert (await client.get(f"/api/v1/patients/{theirs['id']}", headers=patient.headers)).status_code == 404


@pytest.mark.parametrize(("role", "specialties"), [
    ("registrar", []), ("admin", []),
])
async def test_front_desk_roles_read_a_card_through_their_mask(
    client: AsyncTestClient[Any], staff: Callable[..., Any], patient: Session, role: str, specialties: list[str]
) -> None:
    await client.patch("/api/v1/me", headers=patient.headers, json={
        "full_name": "Vera Secretova", "birth_date": "1980-05-05", "questionnaire": {"diagnosis_history": "E11"}})
    member = await staff(role, specialties)
    card = await client.get(f"/api/v1/patients/{patient.id}", headers=member.headers)
    assert card.status_code == 200
    shown = {k for k, v in card.json().items() if v is not None}
    assert shown == VISIBLE_BY_ROLE[Role(role)] - {"guardian_id"}  # an adult has no guardian to show
    assert set(card.json()) == CARD_FIELDS  # masked fields are null, never missing
    assert card.json()["questionnaire"] is None


@pytest.mark.parametrize(("role", "specialties"), [
    ("doctor", ["endocrinology"]), ("psychologist", ["psychology"]), ("sonographer", ["ultrasound"]),
    ("massage_therapist", ["massage"]), ("methodist", []),
])
async def test_clinicians_and_methodists_see_no_card_without_a_reason(
    client: AsyncTestClient[Any], staff: Callable[..., Any], patient: Session, role: str, specialties: list[str]
) -> None:
    member = await staff(role, specialties)
    assert (await client.get(f"/api/v1/patients/{patient.id}", headers=member.headers)).status_code == 404


async def test_staff_cards_are_not_patient_cards(
    client: AsyncTestClient[Any], staff: Callable[..., Any]
) -> None:
    registrar = await staff("registrar")
    doctor = await staff("doctor", ["urology"])
    assert (await client.get(f"/api/v1/patients/{doctor.id}", headers=registrar.headers)).status_code == 404


async def test_admin_creates_staff_and_only_admin_may(
    client: AsyncTestClient[Any], admin: Session, patient: Session, staff: Callable[..., Any],
    new_phone: Callable[[], str],
) -> None:
    phone = new_phone()
    body = {"phone": phone, "full_name": "Dr Gyn", "role": "doctor", "specialties": ["gynecology", "endocrinology"]}
    for intruder in (patient, await staff("registrar"), await staff("doctor", ["ent"])):
        assert (await client.post("/api/v1/staff", headers=intruder.headers, json=body)).status_code == 403
    created = await client.post("/api/v1/staff", headers=admin.headers, json=body)
    assert created.status_code == 201
    assert created.json()["roles"] == ["doctor"]
    assert created.json()["specialties"] == ["endocrinology", "gynecology"]
    again = await client.post("/api/v1/staff", headers=admin.headers, json={**body, "phone": phone[1:]})
    assert again.status_code == 409
    assert again.json()["extra"]["reason"] == "phone_taken"
    taken_by_patient = await client.post("/api/v1/staff", headers=admin.headers, json={**body, "phone": patient.phone})
    assert taken_by_patient.json()["extra"]["reason"] == "phone_taken"


@pytest.mark.parametrize(("role", "specialties", "reason"), [
    ("doctor", [], "specialty_mismatch"),
    ("doctor", ["massage"], "specialty_mismatch"),
    ("psychologist", ["gynecology"], "specialty_mismatch"),
    ("registrar", ["ent"], "specialty_mismatch"),
    ("patient", [], "role_invalid"),
    ("superuser", [], "invalid_input"),
    ("doctor", ["astrology"], "invalid_input"),
])
async def test_staff_role_and_specialties_must_fit(
    client: AsyncTestClient[Any], admin: Session, new_phone: Callable[[], str], role: str, specialties: list[str],
    reason: str,
) -> None:
    answer = await client.post("/api/v1/staff", headers=admin.headers, json={
        "phone": new_phone(), "full_name": "X", "role": role, "specialties": specialties})
    assert answer.status_code == 422
    assert answer.json()["extra"]["reason"] == reason


async def test_staff_list_pages_by_cursor(
    client: AsyncTestClient[Any], admin: Session, staff: Callable[..., Any], patient: Session
) -> None:
    for _ in range(3):
        await staff("methodist")
    seen: list[str] = []
    cursor = None
    while True:
        params = {"limit": 2, **({"cursor": cursor} if cursor else {})}
        page = (await client.get("/api/v1/staff", headers=admin.headers, params=params)).json()
        seen += [u["id"] for u in page["items"]]
        assert all("patient" not in u["roles"] for u in page["items"])
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert len(seen) == len(set(seen)) >= 4
    assert str(patient.id) not in seen
    assert (await client.get("/api/v1/staff", headers=patient.headers)).status_code == 403
    bad = await client.get("/api/v1/staff", headers=admin.headers, params={"cursor": "nope"})
    assert bad.status_code == 422
    assert (await client.get("/api/v1/staff", headers=admin.headers, params={"limit": 1000})).status_code == 422


async def test_devices_register_move_and_delete(
    client: AsyncTestClient[Any], patient: Session, login: Callable[[str], Any], new_phone: Callable[[], str]
) -> None:
    body = {"platform": "ios", "push_token": "apns-" + uuid.uuid4().hex, "voip_token": "voip-" + uuid.uuid4().hex}
    first = await client.post("/api/v1/devices", headers=patient.headers, json=body)
    assert first.status_code == 201
    assert first.json()["has_voip"] is True
    again = await client.post("/api/v1/devices", headers=patient.headers, json=body)
    assert again.json()["id"] == first.json()["id"]  # the same install, not a second row
    other = await login(new_phone())
    moved = await client.post("/api/v1/devices", headers=other.headers, json=body)
    assert moved.json()["id"] == first.json()["id"]
    assert (await client.delete(f"/api/v1/devices/{first.json()['id']}", headers=patient.headers)).status_code == 404
    assert (await client.delete(f"/api/v1/devices/{first.json()['id']}", headers=other.headers)).status_code == 204
    for bad in ({"platform": "symbian", "push_token": "x"}, {"platform": "android", "push_token": ""},
                {"platform": "android", "push_token": "x" * 5000}):
        assert (await client.post("/api/v1/devices", headers=patient.headers, json=bad)).status_code == 422
