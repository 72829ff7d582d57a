"""The waitlist is the patient's too: they list and withdraw their own requests, and hear of an opening live."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from typing import Any
from uuid import UUID

from litestar.testing import AsyncTestClient
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.chat import streams
from app.scheduling.models import WaitlistRequest
from tests.conftest import Session, refused


async def join(client: AsyncTestClient[Any], who: Session, **body: Any) -> dict[str, Any]:
    answer = await client.post("/api/v1/waitlist", headers=who.headers, json=body)
    assert answer.status_code == 201, answer.text
    request: dict[str, Any] = answer.json()
    return request


async def listed(client: AsyncTestClient[Any], who: Session, **params: str) -> list[str]:
    answer = await client.get("/api/v1/waitlist", headers=who.headers, params=params)
    assert answer.status_code == 200, answer.text
    return [w["id"] for w in answer.json()["items"]]


async def every_request(client: AsyncTestClient[Any], who: Session) -> set[str]:
    """The front desk's whole list of open requests, page by page."""
    seen: set[str] = set()
    cursor: str | None = None
    while True:
        page = (await client.get("/api/v1/waitlist", headers=who.headers,
                                 params={"limit": "100", **({"cursor": cursor} if cursor else {})})).json()
        seen |= {w["id"] for w in page["items"]}
        cursor = page["next_cursor"]
        if cursor is None:
            return seen


async def test_a_patient_lists_and_withdraws_their_own_and_their_childrens_requests(
    client: AsyncTestClient[Any], patient: Session, login: Callable[[str], Any], new_phone: Callable[[], str],
    staff: Callable[..., Any],
) -> None:
    child = (await client.post("/api/v1/me/dependents", headers=patient.headers, json={
        "full_name": "Kid Waiting", "birth_date": "2019-02-02", "relation": "child",
        "legal_basis": "birth certificate"})).json()
    own = await join(client, patient, specialty="urology")
    for_child = await join(client, patient, specialty="pediatrics", patient_id=child["id"])
    stranger = await login(new_phone())
    theirs = await join(client, stranger, specialty="urology")
    assert set(await listed(client, patient)) == {own["id"], for_child["id"]}
    assert await listed(client, stranger) == [theirs["id"]]
    registrar = await staff("registrar")
    assert {own["id"], for_child["id"], theirs["id"]} <= await every_request(client, registrar)

    refused(await client.delete(f"/api/v1/waitlist/{theirs['id']}", headers=patient.headers), 404)
    refused(await client.delete(f"/api/v1/waitlist/{own['id']}", headers=stranger.headers), 404)
    assert (await client.delete(f"/api/v1/waitlist/{for_child['id']}", headers=patient.headers)).status_code == 204
    assert (await client.delete(f"/api/v1/waitlist/{for_child['id']}", headers=patient.headers)).status_code == 204
    assert await listed(client, patient) == [own["id"]]
    assert await listed(client, patient, status="withdrawn") == [for_child["id"]]
    assert await listed(client, stranger) == [theirs["id"]]  # untouched
    resolved = await client.post(f"/api/v1/waitlist/{own['id']}/resolve", headers=registrar.headers,
                                 json={"resolution": "booked by phone"})
    assert resolved.status_code == 200
    refused(await client.delete(f"/api/v1/waitlist/{own['id']}", headers=patient.headers), 409, "waitlist_resolved")
    refused(await client.post(f"/api/v1/waitlist/{theirs['id']}/resolve", headers=patient.headers, json={}), 403)


async def test_an_opening_reaches_the_patient_and_the_requester_live(
    client: AsyncTestClient[Any], specialist: Callable[..., Any], service: Callable[..., Any], patient: Session,
    login: Callable[[str], Any], new_phone: Callable[[], str], book: Callable[..., Any],
    session_maker: async_sessionmaker[AsyncSession],
) -> None:
    doctor, visit_type = await specialist("doctor", ["urology"]), await service("urology")
    waiting, other = await login(new_phone()), await login(new_phone())
    request = await join(client, waiting, specialty="urology", specialist_id=str(doctor.id))
    withdrawn = await join(client, other, specialty="urology")
    assert (await client.delete(f"/api/v1/waitlist/{withdrawn['id']}", headers=other.headers)).status_code == 204
    async with session_maker() as session:
        before = {who.id: await streams.last_seq(session, who.id) for who in (waiting, other)}
    visit = (await book(patient, doctor, visit_type, nth=1)).json()
    assert (await client.post(f"/api/v1/consultations/{visit['id']}/cancel", headers=patient.headers,
                              json={"reason": "feeling better"})).status_code == 200
    async with session_maker() as session:
        notices = [e.data for e in await streams.after(session, waiting.id, before[waiting.id]) if e.type == "notice"]
        others = [e.data for e in await streams.after(session, other.id, before[other.id]) if e.type == "notice"]
    assert notices == [{"kind": "waitlist_slot_available", "waitlist_id": request["id"],
                        "specialist_id": str(doctor.id), "slot_id": visit["slot_id"],
                        "starts_at": notices[0]["starts_at"]}]
    assert dt.datetime.fromisoformat(notices[0]["starts_at"]) == dt.datetime.fromisoformat(visit["starts_at"])
    assert others == []  # a withdrawn request hears nothing


async def test_a_dependents_opening_reaches_their_guardian_when_the_front_desk_asked(
    client: AsyncTestClient[Any], specialist: Callable[..., Any], service: Callable[..., Any], patient: Session,
    login: Callable[[str], Any], new_phone: Callable[[], str], book: Callable[..., Any], staff: Callable[..., Any],
    session_maker: async_sessionmaker[AsyncSession],
) -> None:
    doctor, visit_type = await specialist("doctor", ["urology"]), await service("urology")
    guardian, registrar = await login(new_phone()), await staff("registrar")
    child = (await client.post("/api/v1/me/dependents", headers=guardian.headers, json={
        "full_name": "Kid Called In", "birth_date": "2018-04-04", "relation": "child",
        "legal_basis": "birth certificate"})).json()
    async with session_maker() as session:  # a request the front desk took by phone for the child
        request = WaitlistRequest(patient_id=UUID(child["id"]), requested_by=registrar.id, specialty="urology",
                                  specialist_id=doctor.id, note="")
        session.add(request)
        await session.commit()
        before = await streams.last_seq(session, guardian.id)
    visit = (await book(patient, doctor, visit_type, nth=1)).json()
    assert (await client.post(f"/api/v1/consultations/{visit['id']}/cancel", headers=patient.headers,
                              json={"reason": "feeling better"})).status_code == 200
    async with session_maker() as session:
        notices = [e.data for e in await streams.after(session, guardian.id, before) if e.type == "notice"]
    assert [(n["kind"], n["waitlist_id"], n["slot_id"]) for n in notices] == [
        ("waitlist_slot_available", str(request.id), visit["slot_id"])]
