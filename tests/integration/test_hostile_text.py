"""Text an attacker (or an ordinary user) types: SQL-looking, markup, format strings, emoji with joiners, other
scripts and bidirectional marks. Every free-text field stores it and gives it back unchanged (statements take
parameters; nothing is formatted or sanitised on the way in). Filenames are the exception: they are made safe,
and a right-to-left override cannot make an executable's name read like a PDF's."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any
from uuid import UUID

from litestar.testing import AsyncTestClient
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.consultations.models import Consultation
from tests.conftest import Session

# quotes and comments for SQL, markup for a page, % and {} for format strings, a ZWJ emoji sequence, a flag,
# Cyrillic, Arabic with a right-to-left mark, a left-to-right embedding, a backslash, "NULL" as a word
HOSTILE = ("Robert'); DROP TABLE users; -- \" OR 1=1 /* */ <script>alert('x')</script> %s %(name)s {0} {} "
           "\\x00 NULL 👩‍⚕️🇷🇺 Ёжик ёлка مرحبا\u200f \u202aembedded\u202c")
NAME = "Д'Артаньян-Ёлкин 👶 <b>O'Brien</b> %s {}"


async def ok(answer: Any, status: int = 200) -> dict[str, Any]:
    assert answer.status_code == status, answer.text
    body: dict[str, Any] = answer.json()
    return body


async def test_free_text_round_trips_unchanged_everywhere_it_is_stored(
    client: AsyncTestClient[Any], patient: Session, admin: Session, specialist: Callable[..., Any],
    visit_until: Callable[..., Any], session_maker: async_sessionmaker[AsyncSession],
) -> None:
    # the patient's own name and a dependent's
    me = await ok(await client.patch("/api/v1/me", headers=patient.headers, json={"full_name": NAME}))
    assert me["full_name"] == NAME
    assert (await ok(await client.get("/api/v1/me", headers=patient.headers)))["full_name"] == NAME
    child = await ok(await client.post("/api/v1/me/dependents", headers=patient.headers, json={
        "full_name": NAME, "birth_date": "2019-05-01", "relation": "child", "legal_basis": HOSTILE}), 201)
    listed = (await ok(await client.get("/api/v1/me/dependents", headers=patient.headers)))["items"]
    assert [d["full_name"] for d in listed if d["id"] == child["id"]] == [NAME]
    # a service's title, as the catalogue shows it
    created = await ok(await client.post("/api/v1/services", headers=admin.headers, json={
        "specialty": "endocrinology", "title": HOSTILE[:200], "duration_minutes": 30, "price": "3000.00",
        "in_person_only": False, "stage": "first"}), 201)
    catalogue = (await ok(await client.get("/api/v1/services", headers=patient.headers)))["items"]
    assert [s["title"] for s in catalogue if s["id"] == created["id"]] == [HOSTILE[:200]]
    # a chat message, sent and edited, in the answer and in the history
    doctor = await specialist()
    visit = await visit_until(patient, doctor, created, until="in_progress", nth=1)
    chat = f"/api/v1/chats/{visit['conversation_id']}/messages"
    sent = await ok(await client.post(chat, headers=patient.headers,
                                      json={"text": HOSTILE, "client_id": "hostile-1"}), 201)
    assert sent["text"] == HOSTILE
    history = (await ok(await client.get(chat, headers=doctor.headers)))["items"]
    assert [m["text"] for m in history if m["id"] == sent["id"]] == [HOSTILE]
    edited = await ok(await client.patch(f"{chat}/{sent['id']}", headers=patient.headers,
                                         json={"text": HOSTILE[::-1]}))
    assert edited["text"] == HOSTILE[::-1]
    # the conclusion: recommendations, treatment and a diagnosis's title
    conclusion_url = f"/api/v1/consultations/{visit['id']}/conclusion"
    await ok(await client.post(conclusion_url, headers=doctor.headers, json={
        "recommendations": HOSTILE, "treatment": HOSTILE * 3,
        "diagnoses": [{"code": "E11.9", "title": HOSTILE, "main": True}]}), 201)
    read = await ok(await client.get(conclusion_url, headers=patient.headers))
    assert (read["recommendations"], read["treatment"]) == (HOSTILE, HOSTILE * 3)
    assert [d["title"] for d in read["diagnoses"]] == [HOSTILE]
    # a cancellation's reason
    later = await visit_until(patient, doctor, created, until="booked", nth=4)
    cancelled = await ok(await client.post(f"/api/v1/consultations/{later['id']}/cancel", headers=patient.headers,
                                           json={"reason": HOSTILE}))
    assert cancelled["status"] == "cancelled"
    async with session_maker() as session:  # kept for the clinic's staff, not shown in the API
        assert await session.scalar(select(Consultation.cancel_reason).where(
            Consultation.id == UUID(later["id"]))) == HOSTILE


async def test_a_right_to_left_override_cannot_disguise_a_filename(
    client: AsyncTestClient[Any], patient: Session,
) -> None:
    # shown with the override obeyed, the first one reads as a PDF's name ending in "exe.pdf"
    for disguised in ("счёт\u202efdp.exe", "scan\u2067fdp.exe\u2069", "a\u200e\u200f\u061cb.pdf"):
        created = await ok(await client.post("/api/v1/documents", headers=patient.headers, json={
            "patient_id": str(patient.id), "kind": "analysis", "filename": disguised,
            "content_type": "application/pdf", "size": 100}), 201)
        name = created["document"]["filename"]
        assert not set(name) & set("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069\u200e\u200f\u061c"), name
    assert name == "a___b.pdf"
