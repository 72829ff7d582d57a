"""Reminders before consultations: scheduled at booking (offsets already past skipped), pushed once when due (across
restarts and parallel workers), by SMS with a neutral text when the patient has no device, moved, dropped."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any
from uuid import UUID
from zoneinfo import ZoneInfo

import pytest
from litestar.testing import AsyncTestClient
from sqlalchemy import func, select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker, create_async_engine

from app.notifications import reminders
from app.notifications.models import Reminder
from app.outbox import OutboxEvent
from app.settings import Settings
from tests.conftest import Session, migrated_database_url, running
from tests.integration.test_outbox_worker import device, eventually, idle, own_settings, pushes_to, row_of, stage, to
from tests.standins.fixtures import FcmFixture

Maker = async_sessionmaker[AsyncSession]


@pytest.fixture(scope="module")
def fcm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FcmFixture]:
    standin = FcmFixture(tmp_path_factory.mktemp("fcm"))
    standin.start()
    yield standin
    standin.stop()


@pytest.fixture(scope="module")
async def database_url(data_dir: Path) -> str:
    url = await migrated_database_url(data_dir, "reminders")
    return url


@pytest.fixture(scope="module")
def test_settings(data_dir: Path, database_url: str, fcm: FcmFixture) -> Settings:
    return fcm.settings(own_settings(data_dir, database_url), outbox_poll_seconds=0.2, reminder_offsets="24h,1h")


@pytest.fixture(scope="module")
async def client(test_settings: Settings) -> AsyncIterator[AsyncTestClient[Any]]:
    async with running(test_settings) as c:
        yield c


@pytest.fixture(scope="module")
async def session_maker(database_url: str) -> AsyncIterator[Maker]:
    engine = create_async_engine(database_url)
    yield async_sessionmaker(engine, expire_on_commit=False)
    await engine.dispose()


async def booked(patient: Session, specialist: Callable[..., Any], service: Callable[..., Any],
                 visit_until: Callable[..., Any]) -> dict[str, Any]:
    """A confirmed visit two hours or more ahead (slots every 30 minutes from now)."""
    visit: dict[str, Any] = await visit_until(patient, await specialist(), await service(), "confirmed", nth=5)
    return visit


async def reminders_of(session_maker: Maker, visit_id: str) -> list[Reminder]:
    async with session_maker() as session:
        return list((await session.scalars(select(Reminder).where(Reminder.consultation_id == UUID(visit_id))
                                           .order_by(Reminder.offset_minutes))).all())


async def due_now(session_maker: Maker, visit_id: str) -> None:
    """Bring the visit's reminders forward to now (the clock cannot be)."""
    async with session_maker() as session:
        await session.execute(update(Reminder).where(Reminder.consultation_id == UUID(visit_id))
                              .values(due_at=dt.datetime.now(dt.UTC) - dt.timedelta(seconds=1)))
        await session.commit()


async def reminder_rows(session_maker: Maker, visit_id: str) -> list[OutboxEvent]:
    async with session_maker() as session:
        return list((await session.scalars(select(OutboxEvent).where(
            OutboxEvent.type == "reminder", OutboxEvent.aggregate_id == UUID(visit_id)))).all())


def sms_to(settings: Settings, phone: str) -> list[str]:
    path = Path(settings.resolved_sms_log_path)
    lines = path.read_text().splitlines() if path.exists() else []
    return [e["text"] for e in map(json.loads, lines) if e["to"] == phone and "code:" not in e["text"]]


async def test_booking_schedules_the_offsets_still_ahead(
    patient: Session, specialist: Callable[..., Any], service: Callable[..., Any], visit_until: Callable[..., Any],
    session_maker: Maker,
) -> None:
    visit = await booked(patient, specialist, service, visit_until)
    [only] = await reminders_of(session_maker, visit["id"])  # 24 hours before is already past: skipped
    assert only.offset_minutes == 60
    starts_at = dt.datetime.fromisoformat(visit["starts_at"])
    assert only.due_at == starts_at - dt.timedelta(hours=1)


def test_offsets_are_read_from_the_setting() -> None:
    assert reminders.offsets(Settings(reminder_offsets="1h, 24h,30m,1d")) == [1440, 60, 30]
    assert reminders.offsets(Settings(reminder_offsets="")) == []
    with pytest.raises(ValueError, match="REMINDER_OFFSETS"):
        reminders.offsets(Settings(reminder_offsets="soon"))


async def test_a_due_reminder_is_pushed_once_even_across_a_restart(
    client: AsyncTestClient[Any], fcm: FcmFixture, patient: Session, specialist: Callable[..., Any],
    service: Callable[..., Any], visit_until: Callable[..., Any], session_maker: Maker, test_settings: Settings,
) -> None:
    token = await device(client, patient)
    visit = await booked(patient, specialist, service, visit_until)
    await due_now(session_maker, visit["id"])
    [push] = await pushes_to(fcm, token, kind="reminder")
    assert push.message["data"] == {"type": "reminder", "ref": visit["id"]}
    async with running(test_settings) as restarted:  # a second worker, as after a restart, on the same rows
        await idle(restarted)
        await idle(client)
    assert len(to(fcm, token, "reminder")) == 1
    [row] = await reminder_rows(session_maker, visit["id"])
    assert row.dispatched_at is not None
    assert all(r.staged_at is not None for r in await reminders_of(session_maker, visit["id"]))


async def test_a_patient_without_a_device_gets_a_neutral_sms(
    client: AsyncTestClient[Any], patient: Session, specialist: Callable[..., Any], service: Callable[..., Any],
    visit_until: Callable[..., Any], session_maker: Maker, test_settings: Settings,
) -> None:
    visit = await booked(patient, specialist, service, visit_until)
    await due_now(session_maker, visit["id"])

    async def texted() -> list[str]:
        return sms_to(test_settings, patient.phone)

    [text] = await eventually(texted, "a reminder SMS")
    local = dt.datetime.fromisoformat(visit["starts_at"]).astimezone(ZoneInfo("Europe/Moscow"))
    assert text == f"Напоминание: у вас запись в клинике {local:%d.%m.%Y} в {local:%H:%M}"  # noqa: RUF001
    await idle(client)
    assert len(sms_to(test_settings, patient.phone)) == 1


async def test_a_cancelled_visit_has_no_reminders_and_a_staged_one_is_dropped(
    client: AsyncTestClient[Any], fcm: FcmFixture, patient: Session, specialist: Callable[..., Any],
    service: Callable[..., Any], visit_until: Callable[..., Any], session_maker: Maker,
) -> None:
    token = await device(client, patient)
    visit = await booked(patient, specialist, service, visit_until)
    assert await reminders_of(session_maker, visit["id"]) != []
    cancelled = await client.post(f"/api/v1/consultations/{visit['id']}/cancel", headers=patient.headers)
    assert cancelled.status_code == 200, cancelled.text
    assert await reminders_of(session_maker, visit["id"]) == []
    # one staged just before the cancel (the worker had it in hand): it is not sent
    event_id = await stage(session_maker, "reminder", UUID(visit["id"]), [patient.id],
                           {"starts_at": visit["starts_at"], "offset_minutes": 60})

    async def dispatched() -> bool:
        return (await row_of(session_maker, event_id)).dispatched_at is not None

    await eventually(dispatched, "the void reminder is done with")
    assert to(fcm, token, "reminder") == []


async def test_a_moved_visit_moves_its_reminders(
    patient: Session, specialist: Callable[..., Any], service: Callable[..., Any], visit_until: Callable[..., Any],
    session_maker: Maker, test_settings: Settings,
) -> None:
    visit = await booked(patient, specialist, service, visit_until)
    later = dt.datetime.fromisoformat(visit["starts_at"]) + dt.timedelta(days=2)
    async with session_maker() as session:
        await reminders.move(session, test_settings, UUID(visit["id"]), later)
        await session.commit()
    moved = await reminders_of(session_maker, visit["id"])
    assert [(r.offset_minutes, r.due_at) for r in moved] == [
        (60, later - dt.timedelta(hours=1)), (1440, later - dt.timedelta(days=1))]


async def test_parallel_workers_stage_a_reminder_once(
    patient: Session, specialist: Callable[..., Any], service: Callable[..., Any], visit_until: Callable[..., Any],
    session_maker: Maker,
) -> None:
    visit = await booked(patient, specialist, service, visit_until)
    await due_now(session_maker, visit["id"])

    async def stage_due() -> int:
        async with session_maker() as session:
            staged = await reminders.stage_due(session, dt.datetime.now(dt.UTC))
            await session.commit()
            return staged

    await asyncio.gather(*(stage_due() for _ in range(4)))  # beside the app's own worker
    async with session_maker() as session:
        count = await session.scalar(select(func.count()).select_from(OutboxEvent).where(
            OutboxEvent.type == "reminder", OutboxEvent.aggregate_id == UUID(visit["id"])))
    assert count == 1


async def test_a_dependents_reminder_goes_to_the_guardian(
    client: AsyncTestClient[Any], fcm: FcmFixture, patient: Session, session_maker: Maker,
    specialist: Callable[..., Any], service: Callable[..., Any], visit_until: Callable[..., Any],
) -> None:
    token = await device(client, patient)
    child = await client.post("/api/v1/me/dependents", headers=patient.headers, json={
        "full_name": "Петя Иванов", "birth_date": "2018-03-01", "relation": "parent",
        "legal_basis": "birth certificate II-AB 654321"})
    assert child.status_code == 201, child.text
    visit = await visit_until(patient, await specialist(), await service(), "confirmed", nth=5,
                              patient_id=child.json()["id"])
    await due_now(session_maker, visit["id"])
    [push] = await pushes_to(fcm, token, kind="reminder")
    assert push.message["data"] == {"type": "reminder", "ref": visit["id"]}
    assert uuid.UUID(visit["patient_id"]) != patient.id
