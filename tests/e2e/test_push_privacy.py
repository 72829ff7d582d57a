"""What crosses Google's, Apple's and the SMS operator's servers, and what the logs hold: after a whole scenario
(chat messages, a conclusion, a low rating, reminders by push and by SMS, a call) every byte the FCM and APNs
stand-ins and the SMS gateway received holds no name, phone, diagnosis or message text: only ids, types and neutral
titles (and for an SMS, the number it is sent to); and no line the app logged meanwhile holds any of them."""

# ruff: noqa: RUF001  (Russian text)

from __future__ import annotations

import datetime as dt
import json
import logging
import secrets
import threading
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any
from uuid import UUID

import msgspec
import pytest
from litestar.testing import AsyncTestClient
from sqlalchemy import func, select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker, create_async_engine

from app.accounts.models import Device
from app.notifications.models import Reminder
from app.observability import JsonFormatter, RedactingFilter
from app.outbox import OutboxEvent
from app.settings import Settings
from tests.conftest import Session, migrated_database_url, running
from tests.integration import conftest as booking
from tests.integration.test_outbox_worker import device, eventually, own_settings, stage
from tests.integration.test_sms_gateway import Gateway
from tests.standins.apns import ApnsStandin
from tests.standins.fixtures import FcmFixture

Maker = async_sessionmaker[AsyncSession]
visit_until = booking.visit_until  # the integration suite's fixture, here too
PATIENT, DEPENDENT, OTHER, DOCTOR = "Анна Секретова", "Маша Секретова", "Борис Тайнов", "Игорь Врачевский"
MESSAGES = ("Ваш HbA1c 8,1 процента, это сахарный диабет", "У меня болит голова после метформина")
DIAGNOSIS = ("E11.9", "Сахарный диабет 2 типа")
TREATMENT = "Метформин 500 мг дважды в день"
COMPLAINT = "Врач был груб и опоздал"


class Lines(logging.Handler):
    """Every record as the app's own log handler writes it (app/observability.py configure_logging)."""

    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []
        self.setFormatter(JsonFormatter())
        self.addFilter(RedactingFilter())

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


@pytest.fixture
def logged() -> Iterator[Lines]:
    root, lines = logging.getLogger(), Lines()
    level = root.level
    root.addHandler(lines)
    root.setLevel(logging.INFO)  # what production logs at least
    try:
        yield lines
    finally:
        root.removeHandler(lines)
        root.setLevel(level)


@pytest.fixture(scope="module")
def fcm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FcmFixture]:
    standin = FcmFixture(tmp_path_factory.mktemp("fcm"))
    standin.start()
    yield standin
    standin.stop()


@pytest.fixture(scope="module")
def apns(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApnsStandin]:
    standin = ApnsStandin(tmp_path_factory.mktemp("apns")).start()
    yield standin
    standin.stop()


@pytest.fixture(scope="module")
def gateway() -> Iterator[Gateway]:
    gw = Gateway()
    thread = threading.Thread(target=gw.server.serve_forever, daemon=True)
    thread.start()
    yield gw
    gw.server.shutdown()
    gw.server.server_close()


@pytest.fixture(scope="module")
async def database_url(data_dir: Path) -> str:
    url = await migrated_database_url(data_dir, "privacy")
    return url


@pytest.fixture(scope="module")
def test_settings(data_dir: Path, database_url: str, fcm: FcmFixture, apns: ApnsStandin, gateway: Gateway) -> Settings:
    base = msgspec.structs.replace(own_settings(data_dir, database_url), log_requests=True, log_level="INFO")
    return apns.settings(fcm.settings(base, outbox_poll_seconds=0.2, sms_backend="http", sms_http_url=gateway.url))


@pytest.fixture(scope="module")
async def client(test_settings: Settings) -> AsyncIterator[AsyncTestClient[Any]]:
    async with running(test_settings) as c:
        yield c


@pytest.fixture(scope="module")
async def session_maker(database_url: str) -> AsyncIterator[Maker]:
    engine = create_async_engine(database_url)
    yield async_sessionmaker(engine, expire_on_commit=False)
    await engine.dispose()


@pytest.fixture
def login(client: AsyncTestClient[Any], gateway: Gateway) -> Callable[[str], Any]:
    """Sign in with the code the SMS gateway received."""

    async def do(phone: str) -> Session:
        assert (await client.post("/api/v1/auth/otp", json={"phone": phone})).status_code == 202
        text = next(body["text"] for _, body in reversed(gateway.received) if body["to"] == phone)
        answer = await client.post("/api/v1/auth/token", json={"phone": phone, "code": text.split("code: ")[1][:6]})
        assert answer.status_code == 200, answer.text
        body = answer.json()
        return Session(id=UUID(body["user"]["id"]), phone=phone, access=body["access_token"],
                       refresh=body["refresh_token"])

    return do


async def named(client: AsyncTestClient[Any], who: Session, name: str) -> None:
    assert (await client.patch("/api/v1/me", headers=who.headers, json={"full_name": name})).status_code == 200


async def ios(client: AsyncTestClient[Any], who: Session) -> str:
    voip = secrets.token_hex(32)
    answer = await client.post("/api/v1/devices", headers=who.headers, json={
        "platform": "ios", "push_token": f"ios-{secrets.token_hex(8)}", "voip_token": voip})
    assert answer.status_code == 201, answer.text
    return voip


async def act(client: AsyncTestClient[Any], who: Session, path: str, body: Any = None, status: int = 200) -> Any:
    answer = await client.post(path, headers=who.headers, json=body)
    assert answer.status_code == status, answer.text
    return answer.json() if answer.content else None


async def test_nothing_personal_or_medical_reaches_a_push_service_or_the_sms_gateway(
    client: AsyncTestClient[Any], fcm: FcmFixture, apns: ApnsStandin, gateway: Gateway, session_maker: Maker,
    patient: Session, admin: Session, login: Callable[[str], Any], new_phone: Callable[[], str],
    specialist: Callable[..., Any], service: Callable[..., Any], visit_until: Callable[..., Any], logged: Lines,
) -> None:
    doctor = await specialist()
    await named(client, doctor, DOCTOR)
    await named(client, patient, PATIENT)
    other: Session = await login(new_phone())  # a patient without the app: reminders by SMS
    await named(client, other, OTHER)
    android = await device(client, patient)
    voip = await ios(client, patient)
    await device(client, doctor)
    await device(client, admin)
    child = await act(client, patient, "/api/v1/me/dependents", {
        "full_name": DEPENDENT, "birth_date": "2019-05-01", "relation": "parent",
        "legal_basis": "birth certificate II-AB 123456"}, 201)
    visit_type = await service()

    visit = await visit_until(patient, doctor, visit_type, "in_progress", nth=1)
    for author, text in zip((doctor, patient), MESSAGES, strict=True):
        await act(client, author, f"/api/v1/chats/{visit['conversation_id']}/messages",
                  {"client_id": uuid.uuid4().hex, "text": text}, 201)
    await act(client, doctor, f"/api/v1/consultations/{visit['id']}/conclusion", {
        "diagnoses": [{"code": DIAGNOSIS[0], "title": DIAGNOSIS[1], "main": True}], "treatment": TREATMENT,
        "recommendations": TREATMENT}, 201)
    await act(client, doctor, f"/api/v1/consultations/{visit['id']}/complete")
    await act(client, patient, f"/api/v1/consultations/{visit['id']}/rating", {"score": 1, "comment": COMPLAINT},
              201)
    ahead = [await visit_until(patient, doctor, visit_type, "confirmed", nth=5, patient_id=child["id"]),
             await visit_until(other, doctor, visit_type, "confirmed", nth=6)]
    async with session_maker() as session:  # their reminders due now (the clock cannot be moved)
        await session.execute(update(Reminder).where(Reminder.consultation_id.in_([UUID(v["id"]) for v in ahead]))
                              .values(due_at=dt.datetime.now(dt.UTC) - dt.timedelta(seconds=1)))
        await session.commit()
    call_id = uuid.uuid4()
    await stage(session_maker, "call.incoming", call_id, [patient.id], {"ref": str(call_id)})

    async def all_sent() -> bool:
        async with session_maker() as session:
            pending = await session.scalar(select(func.count()).select_from(OutboxEvent).where(
                OutboxEvent.dispatched_at.is_(None)))
            reminders = await session.scalar(select(func.count()).select_from(OutboxEvent).where(
                OutboxEvent.type == "reminder", OutboxEvent.dispatched_at.is_not(None)))
        return pending == 0 and reminders == 2

    await eventually(all_sent, "every outbox row delivered", timeout=60)

    kinds = {r.message["data"]["type"] for r in fcm.requests}
    assert {"message.new", "notice", "reminder", "call.incoming"} <= kinds
    assert any(r.token == android for r in fcm.requests)
    assert [r.device_token for r in apns.requests] == [voip]  # the call, by VoIP
    reminder_sms = [body for _, body in gateway.received if body["to"] == other.phone and "code:" not in body["text"]]
    assert len(reminder_sms) == 1

    forbidden = [*PATIENT.split(), *DEPENDENT.split(), *OTHER.split(), *DOCTOR.split(), *MESSAGES, *DIAGNOSIS,
                 "диабет", "HbA1c", "метформин", TREATMENT, COMPLAINT, "груб"]
    phones = [p.lstrip("+") for p in (patient.phone, other.phone, doctor.phone, admin.phone)]
    wire = [json.dumps({"path": r.path, "headers": r.headers, "body": r.body}, ensure_ascii=False)
            for r in fcm.requests]
    wire += [json.dumps({"path": r.path, "headers": r.headers, "body": r.body}, ensure_ascii=False)
             for r in apns.requests]
    # an SMS names the number it goes to, and only there
    wire += [json.dumps({"headers": headers, "text": body["text"]}, ensure_ascii=False)
             for headers, body in gateway.received]
    everything = "\n".join(wire)
    for secret in forbidden:
        assert secret.casefold() not in everything.casefold(), secret
    for phone in phones:
        assert phone not in everything, phone
        assert phone[1:] not in everything, phone  # without the country code

    requests = [json.loads(line) for line in logged.lines if json.loads(line)["logger"] == "app.access"]
    assert len(requests) >= 15  # the scenario's requests, each with its id and, signed in, its user's id
    assert all(r["request_id"] for r in requests)
    assert {str(patient.id), str(doctor.id)} <= {r["user_id"] for r in requests}
    logs = "\n".join(logged.lines)
    for secret in forbidden:
        assert secret.casefold() not in logs.casefold(), secret
    for phone in phones:
        assert phone not in logs, phone
        assert phone[1:] not in logs, phone
    assert msgspec.json.decode(msgspec.json.encode(reminder_sms[0]))["text"].startswith(
        "Напоминание: у вас запись в клинике")


async def test_a_dead_voip_token_is_forgotten_and_the_phone_keeps_its_other_pushes(
    client: AsyncTestClient[Any], fcm: FcmFixture, apns: ApnsStandin, session_maker: Maker, patient: Session,
) -> None:
    voip = await ios(client, patient)
    apns.answer_token(voip, 410, "Unregistered")
    call_id = uuid.uuid4()
    await stage(session_maker, "call.incoming", call_id, [patient.id], {"ref": str(call_id)})

    async def forgotten() -> list[Device]:
        async with session_maker() as session:
            found = list((await session.scalars(select(Device).where(Device.user_id == patient.id))).all())
        return found if found and all(d.voip_token is None for d in found) else []

    [phone] = await eventually(forgotten, "the VoIP token is cleared, the device kept", timeout=30)
    assert phone.push_token.startswith("ios-")  # FCM still reaches it with messages, reminders and notices
    assert voip in [r.device_token for r in apns.requests]
