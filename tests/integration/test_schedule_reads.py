"""Who sees which consultations in a calendar, with which patient card; whose free slots a list and the feed show."""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Callable
from typing import Any
from zoneinfo import ZoneInfo

from litestar.testing import AsyncTestClient

from tests.conftest import Session
from tests.integration.conftest import free_slots

CHILD = {"full_name": "Little Kid", "birth_date": "2019-05-04", "relation": "child",
         "legal_basis": "birth certificate II-AB 123456", "sex": "male"}


async def calendar(client: AsyncTestClient[Any], who: Session, **params: Any) -> dict[str, Any]:
    answer = await client.get("/api/v1/consultations", headers=who.headers, params=params)
    assert answer.status_code == 200, answer.text
    body: dict[str, Any] = answer.json()
    return body


async def test_each_side_of_a_visit_sees_its_own_calendar_and_its_mask(
    client: AsyncTestClient[Any], specialist: Callable[..., Any], service: Callable[..., Any],
    login: Callable[[str], Any], new_phone: Callable[[], str], book: Callable[..., Any], staff: Callable[..., Any],
) -> None:
    doctor, other_doctor, visit_type = await specialist(), await specialist(), await service()
    guardian, stranger = await login(new_phone()), await login(new_phone())
    await client.patch("/api/v1/me", headers=guardian.headers, json={"full_name": "Maria Ivanova"})
    child = (await client.post("/api/v1/me/dependents", headers=guardian.headers, json=CHILD)).json()
    own = (await book(guardian, doctor, visit_type, nth=3)).json()
    childs = (await book(guardian, doctor, visit_type, nth=1, patient_id=child["id"])).json()
    strangers = (await book(stranger, doctor, visit_type, nth=5)).json()
    elsewhere = (await book(stranger, other_doctor, visit_type, nth=9)).json()

    # the guardian: their own and their dependent's, by time, with both cards in full
    mine = (await calendar(client, guardian))["items"]
    assert [c["id"] for c in mine] == [childs["id"], own["id"]]
    assert mine[0]["patient"] == {"id": child["id"], "full_name": "Little Kid", "initials": "L.K.",
                                  "age": mine[0]["patient"]["age"], "is_dependent": True}
    assert isinstance(mine[0]["patient"]["age"], int)
    assert mine[1]["patient"]["full_name"] == "Maria Ivanova"
    assert mine[1]["patient"]["is_dependent"] is False
    assert [c["id"] for c in (await calendar(client, stranger))["items"]] == [strangers["id"], elsewhere["id"]]

    # the doctor: their own calendar only, whichever specialist they name
    for params in ({}, {"specialist_id": str(other_doctor.id)}):
        seen = (await calendar(client, doctor, **params))["items"]
        assert [c["id"] for c in seen] == [childs["id"], own["id"], strangers["id"]]
    assert (await calendar(client, doctor))["items"][1]["patient"]["initials"] == "M.I."

    # the front desk: any specialist's, with the identity but nothing of a doctor's pseudonymous card
    registrar = await staff("registrar")
    desk = (await calendar(client, registrar, specialist_id=str(doctor.id)))["items"]
    assert [c["id"] for c in desk] == [childs["id"], own["id"], strangers["id"]]
    assert desk[1]["patient"] == {"id": str(guardian.id), "full_name": "Maria Ivanova", "initials": None,
                                  "age": None, "is_dependent": False}
    assert [c["id"] for c in (await calendar(client, registrar, specialist_id=str(other_doctor.id)))["items"]] \
        == [elsewhere["id"]]
    assert (await calendar(client, registrar, specialist_id=str(uuid.uuid4())))["items"] == []


async def test_calendar_pages_follow_the_cursor_and_filters(
    client: AsyncTestClient[Any], specialist: Callable[..., Any], service: Callable[..., Any],
    login: Callable[[str], Any], new_phone: Callable[[], str], book: Callable[..., Any],
) -> None:
    doctor, visit_type = await specialist(), await service()
    booked = [(await book(await login(new_phone()), doctor, visit_type, nth=nth)).json() for nth in (2, 4, 6, 8, 10)]
    seen, cursor = [], None
    while True:
        page = await calendar(client, doctor, limit=2, **({"cursor": cursor} if cursor else {}))
        seen += [c["id"] for c in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
        assert len(page["items"]) == 2
    assert seen == [c["id"] for c in booked]
    first = dt.datetime.fromisoformat(booked[1]["starts_at"])
    window = await calendar(client, doctor, tz="UTC", **{
        "from": first.astimezone(dt.UTC).isoformat(), "to": (first + dt.timedelta(minutes=1)).isoformat()})
    assert [c["id"] for c in window["items"]] == [booked[1]["id"]]
    assert window["items"][0]["starts_at"].endswith("Z")
    assert (await calendar(client, doctor, status="cancelled"))["items"] == []
    pending = await calendar(client, doctor, status="pending_confirmation")
    assert [c["id"] for c in pending["items"]] == [c["id"] for c in booked]


async def test_free_slots_are_a_specialists_only(
    client: AsyncTestClient[Any], specialist: Callable[..., Any], staff: Callable[..., Any], patient: Session,
) -> None:
    doctor = await specialist()
    registrar, unscheduled = await staff("registrar"), await staff("doctor", ["urology"])
    for nobody in (registrar.id, patient.id, uuid.uuid4()):
        answer = await client.get(f"/api/v1/specialists/{nobody}/slots", headers=patient.headers)
        assert answer.status_code == 404, answer.text
    assert await free_slots(client, patient, unscheduled.id) == []  # a specialist, with no schedule yet
    far = (dt.date.today() + dt.timedelta(days=60)).isoformat()
    assert await free_slots(client, patient, doctor.id, **{"from": far, "to": far}) == []  # past the horizon
    slots = await free_slots(client, patient, doctor.id, tz="UTC")
    assert slots
    assert all(s["specialist_id"] == str(doctor.id) for s in slots)
    assert [s["starts_at"] for s in slots] == sorted(s["starts_at"] for s in slots)
    assert dt.datetime.fromisoformat(slots[0]["starts_at"]) > dt.datetime.now(dt.UTC)


async def test_the_feed_lists_the_free_slots_of_the_directions_specialists(
    client: AsyncTestClient[Any], specialist: Callable[..., Any], service: Callable[..., Any],
    staff: Callable[..., Any], patient: Session, book: Callable[..., Any],
) -> None:
    both = await specialist("doctor", ["urology", "gynecology"])
    await staff("registrar")
    visit_type = await service("urology")
    booked = (await book(patient, both, visit_type, nth=1)).json()
    held = (await free_slots(client, patient, both.id))[2]
    assert (await client.post(f"/api/v1/slots/{held['id']}/hold", headers=patient.headers)).status_code == 201
    today = dt.datetime.now(ZoneInfo("Europe/Moscow")).date()  # the feed's days are the clinic's
    window = {"from": today.isoformat(), "to": (today + dt.timedelta(days=2)).isoformat()}
    for specialty in ("urology", "gynecology"):
        answer = await client.get("/api/v1/slots/feed", params={"specialty": specialty, **window})
        items = answer.json()["items"]
        mine = [i for i in items if i["specialist_id"] == str(both.id)]
        assert mine
        assert all(i["specialties"] == ["gynecology", "urology"] for i in mine)
        assert {booked["slot_id"], held["id"]}.isdisjoint(i["id"] for i in items)
        assert [(i["starts_at"], i["id"]) for i in items] == sorted((i["starts_at"], i["id"]) for i in items)
    massage = await client.get("/api/v1/slots/feed", params={"specialty": "massage", **window})
    assert str(both.id) not in {i["specialist_id"] for i in massage.json()["items"]}
