"""Care means a real consultation: it starts at confirmation and ends CARE_AFTER_DAYS after completion.

One rule decides the card and the conclusions alike; methodists read no card by id.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from typing import Any

from litestar.testing import AsyncTestClient
from sqlalchemy import update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.consultations.models import Consultation
from app.settings import Settings
from tests.conftest import Session, refused
from tests.integration.test_conclusions import conclusion_url, named, written


async def set_visit(session_maker: async_sessionmaker[AsyncSession], visit: dict[str, Any], **values: Any) -> None:
    """What only time (or a day at the clinic) brings about, arranged in the database."""
    async with session_maker() as session:
        await session.execute(update(Consultation).where(Consultation.id == visit["id"]).values(**values))
        await session.commit()


async def test_care_starts_at_confirmation_and_ends_after_completion(
    client: AsyncTestClient[Any], patient: Session, specialist: Callable[..., Any], service: Callable[..., Any],
    staff: Callable[..., Any], book: Callable[..., Any], visit_until: Callable[..., Any],
    session_maker: async_sessionmaker[AsyncSession], test_settings: Settings,
) -> None:
    await named(client, patient)
    author, doctor = await specialist(), await specialist()
    endo = await service()
    first = await visit_until(patient, author, endo, until="confirmed", nth=1)
    await set_visit(session_maker, first, status="in_progress", started_at=dt.datetime.now(dt.UTC))
    conclusion = await written(client, author, first, treatment="Metformin")
    card_url, conclusion_path = f"/api/v1/patients/{patient.id}", conclusion_url(first)

    async def reads(who: Session) -> tuple[int, int]:
        card = await client.get(card_url, headers=who.headers)
        note = await client.get(conclusion_path, headers=who.headers)
        return card.status_code, note.status_code

    # a request that nobody confirmed yet is no care
    asked = await book(patient, doctor, endo, nth=2)
    assert asked.status_code == 201, asked.text
    visit = asked.json()
    assert visit["status"] == "pending_confirmation"
    assert await reads(doctor) == (404, 404)
    refused(await client.get(card_url, headers=doctor.headers), 404)

    registrar = await staff("registrar")
    confirmed = await client.post(f"/api/v1/consultations/{visit['id']}/confirm", headers=registrar.headers)
    assert confirmed.status_code == 200, confirmed.text
    assert await reads(doctor) == (200, 200)
    assert (await client.get(conclusion_path, headers=doctor.headers)).json() == conclusion

    now = dt.datetime.now(dt.UTC)
    days = dt.timedelta(days=test_settings.care_after_days)
    await set_visit(session_maker, visit, status="completed", completed_at=now - days + dt.timedelta(days=1))
    assert await reads(doctor) == (200, 200)  # completed within CARE_AFTER_DAYS: still in care
    await set_visit(session_maker, visit, completed_at=now - days - dt.timedelta(days=1))
    assert await reads(doctor) == (404, 404)  # long after completion: no longer
    await set_visit(session_maker, visit, status="no_show", completed_at=None)
    assert await reads(doctor) == (404, 404)  # a visit that did not happen grants no care

    assert await reads(author) == (200, 200)  # the author's own visit is under way


async def test_methodists_read_no_card_by_id(
    client: AsyncTestClient[Any], patient: Session, staff: Callable[..., Any]
) -> None:
    methodist = await staff("methodist")
    refused(await client.get(f"/api/v1/patients/{patient.id}", headers=methodist.headers), 404)


async def test_my_patients_are_the_patients_in_care(
    client: AsyncTestClient[Any], patient: Session, specialist: Callable[..., Any], service: Callable[..., Any],
    staff: Callable[..., Any], book: Callable[..., Any], session_maker: async_sessionmaker[AsyncSession],
    test_settings: Settings,
) -> None:
    doctor, endo = await specialist(), await service()

    async def listed(tab: str) -> list[str]:
        answer = await client.get("/api/v1/my-patients", headers=doctor.headers, params={"tab": tab})
        assert answer.status_code == 200, answer.text
        return [r["patient"]["id"] for r in answer.json()["items"]]

    asked = await book(patient, doctor, endo, nth=2)
    assert asked.status_code == 201, asked.text
    visit = asked.json()
    assert visit["status"] == "pending_confirmation"
    assert await listed("actual") == []  # a request is no care
    assert await listed("archive") == []

    registrar = await staff("registrar")
    confirmed = await client.post(f"/api/v1/consultations/{visit['id']}/confirm", headers=registrar.headers)
    assert confirmed.status_code == 200, confirmed.text
    assert await listed("actual") == [str(patient.id)]

    now = dt.datetime.now(dt.UTC)
    days = dt.timedelta(days=test_settings.care_after_days)
    await set_visit(session_maker, visit, status="completed", completed_at=now - days + dt.timedelta(days=1))
    assert await listed("archive") == [str(patient.id)]  # visits over, still in care
    assert await listed("actual") == []
    await set_visit(session_maker, visit, completed_at=now - days - dt.timedelta(days=1))
    assert await listed("actual") == []  # care lapsed: listed nowhere
    assert await listed("archive") == []
    await set_visit(session_maker, visit, status="no_show", completed_at=None)
    assert await listed("actual") == []
    assert await listed("archive") == []
