"""The outbox worker against the FCM stand-in: who is pushed, what a push carries, retries that resend only what
failed, the give-up (admin list, metrics), dead tokens, roles and opt-ins, guardians, quiet hours.

These tests run the API on a database of their own, with its in-process worker sending to the FCM stand-in (the
suite's shared client has a worker of its own on the shared database, which would take these rows)."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any
from uuid import UUID
from zoneinfo import ZoneInfo

import msgspec
import pytest
import uvicorn
import websockets
from litestar.testing import AsyncTestClient
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker, create_async_engine

from app import outbox
from app.accounts.models import Device
from app.db import Database
from app.notifications.models import OutboxDelivery
from app.notifications.worker import OutboxWorker, quiet_until
from app.observability import metrics_text
from app.outbox import OutboxEvent
from app.settings import Settings
from tests.conftest import Session, migrated_database_url, running
from tests.e2e.test_gateway import frames_until, nothing_pending, ws_url
from tests.harness import free_port
from tests.standins.fcm import Recorded
from tests.standins.fixtures import FcmFixture

Maker = async_sessionmaker[AsyncSession]


# --- a world of its own: database, FCM stand-in, API with its worker -------------------------------


@pytest.fixture(scope="module")
def fcm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FcmFixture]:
    standin = FcmFixture(tmp_path_factory.mktemp("fcm"))
    standin.start()
    yield standin
    standin.stop()


@pytest.fixture(scope="module")
async def database_url(data_dir: Path) -> str:
    url = await migrated_database_url(data_dir, "outbox")
    return url


def own_settings(data_dir: Path, database_url: str, **extra: Any) -> Settings:
    """The suite's test settings (tests/conftest.py) on another database."""
    return Settings(
        data_dir=str(data_dir), database_url=database_url, redis_url=os.environ.get("TEST_REDIS_URL"),
        sms_log_path=str(data_dir / "sms.log"), jwt_keys=f"t1={secrets.token_urlsafe(40)}",
        secret_key=secrets.token_urlsafe(40), otp_per_ip_per_hour=1_000_000, start_early_minutes=7 * 24 * 60,
        log_requests=False, log_level="WARNING", **extra)


@pytest.fixture(scope="module")
def test_settings(data_dir: Path, database_url: str, fcm: FcmFixture) -> Settings:
    return fcm.settings(own_settings(data_dir, database_url), outbox_retry_base_seconds=0.05,
                        outbox_max_attempts=3, outbox_poll_seconds=0.2)


@pytest.fixture(scope="module")
async def client(test_settings: Settings) -> AsyncIterator[AsyncTestClient[Any]]:
    async with running(test_settings) as c:
        yield c


@pytest.fixture(scope="module")
async def session_maker(database_url: str) -> AsyncIterator[Maker]:
    engine = create_async_engine(database_url)
    yield async_sessionmaker(engine, expire_on_commit=False)
    await engine.dispose()


# --- helpers ---------------------------------------------------------------------------------------


async def eventually(check: Callable[[], Awaitable[Any]], what: str, timeout: float = 15.0) -> Any:
    """Await a condition the worker brings about (it runs in the app's event loop, beside the test)."""
    deadline = time.monotonic() + timeout
    while True:
        found = await check()
        if found:
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout}s: {what}")
        await asyncio.sleep(0.02)


async def device(client: AsyncTestClient[Any], who: Session, token: str | None = None) -> str:
    token = token or f"tok-{secrets.token_hex(12)}"
    answer = await client.post("/api/v1/devices", headers=who.headers,
                               json={"platform": "android", "push_token": token})
    assert answer.status_code in (200, 201), answer.text
    return token


def to(fcm: FcmFixture, token: str, kind: str | None = None) -> list[Recorded]:
    return [r for r in fcm.requests if r.token == token and kind in (None, r.message["data"]["type"])]


async def pushes_to(fcm: FcmFixture, token: str, count: int = 1, kind: str | None = None) -> list[Recorded]:
    async def arrived() -> list[Recorded]:
        found = to(fcm, token, kind)
        return found if len(found) >= count else []

    found: list[Recorded] = await eventually(arrived, f"{count} pushes to {token}")
    return found


async def stage(session_maker: Maker, type_: str, aggregate_id: UUID, recipients: list[Any],
                payload: dict[str, Any]) -> UUID:
    async with session_maker() as session:
        row = OutboxEvent(type=type_, aggregate_id=aggregate_id, recipients=[str(r) for r in recipients],
                          payload=payload)
        session.add(row)
        await session.commit()
        return row.id


async def row_of(session_maker: Maker, event_id: UUID) -> OutboxEvent:
    async with session_maker() as session:
        row = await session.get(OutboxEvent, event_id)
        assert row is not None
        return row


async def idle(client: AsyncTestClient[Any]) -> None:
    """The worker has finished a pass that found nothing due (what was due before this call is handled). The
    app runs on an event loop of its own: its events are read, not awaited, from here."""
    worker = client.app.state.outbox_worker
    worker.idle.clear()
    worker.nudge()

    async def done() -> bool:
        return bool(worker.idle.is_set())

    await eventually(done, "the worker is idle")


async def chat_with(client: AsyncTestClient[Any], patient: Session, specialist: Callable[..., Any],
                    service: Callable[..., Any], visit_until: Callable[..., Any]) -> tuple[Session, str, str]:
    doctor = await specialist()
    visit = await visit_until(patient, doctor, await service(), "confirmed", nth=1)
    return doctor, str(visit["conversation_id"]), str(visit["id"])


async def say(client: AsyncTestClient[Any], who: Session, conversation_id: str, text: str) -> dict[str, Any]:
    answer = await client.post(f"/api/v1/chats/{conversation_id}/messages", headers=who.headers,
                               json={"client_id": uuid.uuid4().hex, "text": text})
    assert answer.status_code == 201, answer.text
    body: dict[str, Any] = answer.json()
    return body


# --- the tests -------------------------------------------------------------------------------------


async def test_a_message_to_an_offline_patient_is_pushed_once_with_ids_only(
    client: AsyncTestClient[Any], fcm: FcmFixture, patient: Session, specialist: Callable[..., Any],
    service: Callable[..., Any], visit_until: Callable[..., Any], session_maker: Maker,
) -> None:
    token = await device(client, patient)
    doctor, conversation, visit_id = await chat_with(client, patient, specialist, service, visit_until)
    [confirmed] = await pushes_to(fcm, token, kind="notice")  # the registrar's confirmation
    assert confirmed.message["data"] == {"type": "notice", "ref": visit_id}
    message = await say(client, doctor, conversation, "your glucose is 7.8, take metformin")
    [push] = await pushes_to(fcm, token, kind="message.new")
    data = push.message["data"]
    assert data == {"type": "message.new", "ref": message["id"]}
    assert "metformin" not in str(push.body)
    assert "7.8" not in str(push.body)
    await idle(client)
    assert len(to(fcm, token)) == 2  # never twice
    async with session_maker() as session:
        row = await session.scalar(select(OutboxEvent).where(OutboxEvent.aggregate_id == UUID(message["id"])))
        assert row is not None
        assert row.dispatched_at is not None
        assert row.lease_owner is None
        states = (await session.scalars(select(OutboxDelivery.state).where(OutboxDelivery.event_id == row.id))).all()
    assert list(states) == ["sent"]


async def test_a_retry_resends_only_to_the_device_that_failed(
    client: AsyncTestClient[Any], fcm: FcmFixture, patient: Session, session_maker: Maker,
) -> None:
    steady, flaky = await device(client, patient), await device(client, patient)
    fcm.answer_token(flaky, "unavailable")
    event_id = await stage(session_maker, "notice", uuid.uuid4(), [patient.id], {"kind": "conclusion_ready"})
    await pushes_to(fcm, flaky, 1)
    fcm.answer_token(flaky, "ok")
    await pushes_to(fcm, flaky, 2)

    async def dispatched() -> bool:
        return (await row_of(session_maker, event_id)).dispatched_at is not None

    await eventually(dispatched, "the row is dispatched after its retry")
    assert len(to(fcm, steady)) == 1  # its push succeeded the first time: not repeated
    pushed = to(fcm, flaky)
    assert len({r.message["android"]["collapse_key"] for r in pushed}) == 1  # the same collapse key on the retry
    assert (await row_of(session_maker, event_id)).attempts == 2


async def test_a_row_that_keeps_failing_is_given_up_and_listed_for_admins(
    client: AsyncTestClient[Any], fcm: FcmFixture, patient: Session, admin: Session, session_maker: Maker,
) -> None:
    token = await device(client, patient)
    fcm.answer_token(token, "internal")
    event_id = await stage(session_maker, "notice", uuid.uuid4(), [patient.id], {"kind": "conclusion_ready"})

    async def failed() -> bool:
        return (await row_of(session_maker, event_id)).failed_at is not None

    await eventually(failed, "the row is marked failed")
    row = await row_of(session_maker, event_id)
    assert row.attempts == 3
    assert row.dispatched_at is None
    assert row.last_error
    assert len(to(fcm, token)) == 3  # one send per attempt, then no more
    listed = await client.get("/api/v1/outbox/failed", headers=admin.headers, params={"limit": 200})
    assert listed.status_code == 200, listed.text
    item = next(i for i in listed.json()["items"] if i["id"] == str(event_id))
    assert item["attempts"] == 3
    assert item["type"] == "notice"
    assert "payload" not in item
    assert (await client.get("/api/v1/outbox/failed", headers=patient.headers)).status_code == 403
    text = metrics_text().decode()
    assert "clinic_outbox_failed_total" in text
    assert "clinic_outbox_retried_total" in text
    assert "clinic_outbox_pending" in text
    assert 'clinic_outbox_sent_total{channel="push"}' in text


async def test_a_dead_token_removes_its_device(
    client: AsyncTestClient[Any], fcm: FcmFixture, patient: Session, session_maker: Maker,
) -> None:
    token = await device(client, patient)
    fcm.answer_token(token, "unregistered")
    event_id = await stage(session_maker, "notice", uuid.uuid4(), [patient.id], {"kind": "conclusion_ready"})
    await pushes_to(fcm, token)

    async def dispatched() -> bool:
        return (await row_of(session_maker, event_id)).dispatched_at is not None

    await eventually(dispatched, "the row is done: a dead token is no reason to retry")
    async with session_maker() as session:
        assert (await session.scalars(select(Device).where(Device.user_id == patient.id))).all() == []


async def test_role_recipients_get_what_they_opted_into(
    client: AsyncTestClient[Any], fcm: FcmFixture, admin: Session, staff: Callable[..., Any],
    session_maker: Maker,
) -> None:
    keen, quiet = await staff("admin"), await staff("admin")
    keen_token, quiet_token = await device(client, keen), await device(client, quiet)
    patched = await client.patch("/api/v1/me", headers=quiet.headers, json={"push_topics": ["chat"]})
    assert patched.status_code == 200, patched.text
    assert patched.json()["push_topics"] == ["chat"]
    assert (await client.get("/api/v1/me", headers=keen.headers)).json()["push_topics"] == ["chat", "alerts"]
    rating_id = uuid.uuid4()
    event_id = await stage(session_maker, "notice", rating_id, ["role:admin"], {"kind": "low_rating", "score": 1})
    [push] = await pushes_to(fcm, keen_token)
    assert push.message["data"] == {"type": "notice", "ref": str(rating_id)}

    async def dispatched() -> bool:
        return (await row_of(session_maker, event_id)).dispatched_at is not None

    await eventually(dispatched, "the low-rating row is done")
    assert to(fcm, quiet_token) == []  # opted out of alerts


async def test_patients_choose_no_topics_and_quiet_hours_come_in_pairs(
    client: AsyncTestClient[Any], patient: Session,
) -> None:
    refused = await client.patch("/api/v1/me", headers=patient.headers, json={"push_topics": ["chat"]})
    assert refused.status_code == 422
    assert refused.json()["extra"]["reason"] == "push_topics_staff_only"
    half = await client.patch("/api/v1/me", headers=patient.headers, json={"quiet_hours_start": "22:00"})
    assert half.status_code == 422
    assert half.json()["extra"]["reason"] == "quiet_hours_incomplete"
    bad = await client.patch("/api/v1/me", headers=patient.headers,
                             json={"quiet_hours_start": "25:00", "quiet_hours_end": "07:00"})
    assert bad.status_code == 422
    ok = await client.patch("/api/v1/me", headers=patient.headers,
                            json={"quiet_hours_start": "22:00", "quiet_hours_end": "07:30"})
    assert ok.status_code == 200, ok.text
    me = ok.json()
    assert (me["quiet_hours_start"], me["quiet_hours_end"]) == ("22:00", "07:30")
    assert me["push_topics"] == ["chat", "consultations", "notices", "alerts", "reminders"]


async def test_a_dependents_events_go_to_the_guardians_devices(
    client: AsyncTestClient[Any], fcm: FcmFixture, patient: Session, session_maker: Maker,
) -> None:
    token = await device(client, patient)
    child = await client.post("/api/v1/me/dependents", headers=patient.headers, json={
        "full_name": "Маша Иванова", "birth_date": "2019-05-01", "relation": "parent",
        "legal_basis": "birth certificate II-AB 123456"})
    assert child.status_code == 201, child.text
    conclusion_id = uuid.uuid4()
    await stage(session_maker, "notice", conclusion_id, [child.json()["id"]], {"kind": "conclusion_ready"})
    [push] = await pushes_to(fcm, token)
    assert push.message["data"] == {"type": "notice", "ref": str(conclusion_id)}


def quiet_now(zone: str) -> tuple[str, str]:
    """Quiet hours around this minute in `zone`, ending in an hour."""
    local = dt.datetime.now(ZoneInfo(zone))
    start, end = local - dt.timedelta(minutes=30), local + dt.timedelta(hours=1)
    return f"{start:%H:%M}", f"{end:%H:%M}"


async def test_quiet_hours_hold_a_chat_push_and_never_a_call(
    client: AsyncTestClient[Any], fcm: FcmFixture, patient: Session, session_maker: Maker,
) -> None:
    token = await device(client, patient)
    start, end = quiet_now("Asia/Vladivostok")
    patched = await client.patch("/api/v1/me", headers=patient.headers, json={
        "timezone": "Asia/Vladivostok", "quiet_hours_start": start, "quiet_hours_end": end})
    assert patched.status_code == 200, patched.text
    message_id, call_id = uuid.uuid4(), uuid.uuid4()
    held = await stage(session_maker, "push", message_id, [patient.id], {"type": "message.new", "ref": str(message_id)})
    await stage(session_maker, "call.incoming", call_id, [patient.id], {"ref": str(call_id)})
    [ring] = await pushes_to(fcm, token)
    assert ring.message["data"] == {"type": "call.incoming", "ref": str(call_id)}
    assert ring.message["android"]["priority"] == "high"
    await idle(client)
    assert len(to(fcm, token)) == 1  # the chat push waits for the morning
    row = await row_of(session_maker, held)
    assert row.dispatched_at is None
    assert row.failed_at is None
    assert row.attempts == 0
    expected = quiet_until(start, end, "Asia/Vladivostok", dt.datetime.now(dt.UTC))
    assert expected is not None
    assert abs((row.next_attempt_at - expected).total_seconds()) < 120


def test_quiet_hours_span_midnight_in_the_users_zone() -> None:
    at = dt.datetime(2026, 12, 2, 20, 0, tzinfo=dt.UTC)  # 23:00 in Moscow
    assert quiet_until("22:00", "07:00", "Europe/Moscow", at) == dt.datetime(2026, 12, 3, 4, 0, tzinfo=dt.UTC)
    # 06:00 in Vladivostok: quiet until 07:00 there
    assert quiet_until("22:00", "07:00", "Asia/Vladivostok", at) == dt.datetime(2026, 12, 2, 21, 0, tzinfo=dt.UTC)
    assert quiet_until("22:00", "07:00", "Asia/Vladivostok", at.replace(hour=9)) is None  # 19:00 there
    assert quiet_until("09:00", "18:00", "Europe/Moscow", at) is None
    assert quiet_until(None, None, "Europe/Moscow", at) is None


async def test_the_worker_wakes_on_commit_not_on_the_poll(
    client: AsyncTestClient[Any], fcm: FcmFixture, patient: Session, session_maker: Maker, test_settings: Settings,
) -> None:
    token = await device(client, patient)
    await idle(client)
    worker = client.app.state.outbox_worker
    slow = msgspec.structs.replace(test_settings, outbox_poll_seconds=3600.0)
    worker.settings = slow  # from now on only a wake-up starts a pass
    try:
        await idle(client)
        async with session_maker() as session:
            outbox.stage(session, "notice", uuid.uuid4(), [str(patient.id)], {"kind": "conclusion_ready"})
            await session.commit()
        await pushes_to(fcm, token)
    finally:
        worker.settings = test_settings
        worker.nudge()


@asynccontextmanager
async def sockets_at(client: AsyncTestClient[Any]) -> AsyncIterator[str]:
    """The test's own app served on loopback for a real WebSocket client, by uvicorn on the app's own event loop
    (the test client runs the app on a loop of its own: its connections, PostgreSQL's among them, live there)."""
    loop = client.app.state.outbox_worker._loop
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(client.app, host="127.0.0.1", port=port, lifespan="off",
                                           log_level="warning"))
    serving = asyncio.run_coroutine_threadsafe(server.serve(), loop)
    while not server.started:  # uvicorn offers no awaitable for it
        if serving.done():
            serving.result()
        await asyncio.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await asyncio.wrap_future(serving)


async def test_a_foreground_socket_means_no_push_and_a_background_one_a_push(
    client: AsyncTestClient[Any], fcm: FcmFixture, patient: Session, specialist: Callable[..., Any],
    service: Callable[..., Any], visit_until: Callable[..., Any],
) -> None:
    token = await device(client, patient)
    doctor, conversation, _ = await chat_with(client, patient, specialist, service, visit_until)
    await pushes_to(fcm, token, kind="notice")
    async with sockets_at(client) as url, websockets.connect(ws_url(url, patient)) as socket:
        await nothing_pending(socket)  # connected: in the foreground
        seen = await say(client, doctor, conversation, "seen live")
        await frames_until(socket, lambda f: f["type"] == "message.new" and f["data"]["id"] == seen["id"])
        await idle(client)
        assert to(fcm, token, "message.new") == []  # it was on the screen
        await socket.send(json.dumps({"type": "presence", "data": {"state": "background"}}))
        await nothing_pending(socket)
        missed = await say(client, doctor, conversation, "app in the background")
        [push] = await pushes_to(fcm, token, kind="message.new")
        assert push.message["data"] == {"type": "message.new", "ref": missed["id"]}


async def test_the_age_of_the_oldest_pending_row_is_a_metric(
    client: AsyncTestClient[Any], patient: Session, session_maker: Maker,
) -> None:
    now = dt.datetime.now(dt.UTC)
    async with session_maker() as session:  # held for an hour (as quiet hours hold one), written 2 minutes ago
        session.add(OutboxEvent(type="notice", aggregate_id=uuid.uuid4(), recipients=[str(patient.id)],
                                payload={"kind": "conclusion_ready"}, created_at=now - dt.timedelta(minutes=2),
                                next_attempt_at=now + dt.timedelta(hours=1)))
        await session.commit()
    running_worker = client.app.state.outbox_worker  # its database lives on the app's loop: a worker on this one
    database = Database(running_worker.settings)
    try:
        await OutboxWorker(database, running_worker.settings, running_worker.sender, running_worker.sms,
                           running_worker.presence).measure()
    finally:
        await database.dispose()
    line = next(x for x in metrics_text().decode().splitlines() if x.startswith("clinic_outbox_oldest_pending_seconds"))
    assert float(line.split()[-1]) >= 120
