"""Payments: the front desk takes the price once; patients pay online through YooKassa (a local stand-in that
speaks its API v3 over HTTP), and a visit is paid only as the provider confirms it; cancelled paid visits owe
a refund, given back through the provider once, or by the desk."""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import json
import secrets
import threading
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from uuid import UUID

import msgspec
import pytest
import sqlalchemy as sa
from advanced_alchemy.types import GUID, DateTimeUTC
from litestar.testing import AsyncTestClient
from sqlalchemy import select, text, update
from sqlalchemy.dialects import postgresql
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker, create_async_engine

from app.consultations.models import Consultation
from app.migrate import upgrade
from app.outbox import OutboxEvent
from app.payments.models import Payment, Refund
from app.payments.provider import ProviderError
from app.payments.yookassa import YooKassa
from app.settings import Settings
from tests.conftest import POSTGRES, Session, fresh_database_url, refused, running

Maker = async_sessionmaker[AsyncSession]
SHOP, SECRET = "123456", "test_secret-key"
NOTIFY = "/api/v1/payments/yookassa/notifications"


class YooKassaStandIn:
    """YooKassa's API v3 as far as the clinic uses it: payments by redirect, fetching them back, refunds.

    Checks HTTP basic auth and the Idempotence-Key (the same key answers the same object)."""

    def __init__(self) -> None:
        self.payments: dict[str, dict[str, Any]] = {}
        self.created: list[dict[str, Any]] = []  # bodies of new payments
        self.refunds: dict[str, dict[str, Any]] = {}
        self.refund_posts: list[tuple[str, dict[str, Any]]] = []  # (key, body) of every refund call
        self.fail_refunds = 0  # answer 500 to this many refund calls first
        self.lose_refunds = 0  # make this many refunds but answer 500, as if the answer were lost on the way
        self.hold: threading.Event | None = None  # while set here and not yet set itself, GETs wait on it
        self.held = threading.Event()  # a GET is waiting on `hold`
        self.by_key: dict[tuple[str, str], tuple[int, dict[str, Any]]] = {}
        self.lock = threading.Lock()
        stand_in = self
        token = base64.b64encode(f"{SHOP}:{SECRET}".encode()).decode()

        class Handler(BaseHTTPRequestHandler):
            def answer(self, status: int, body: dict[str, Any]) -> None:
                raw = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

            def authorised(self) -> bool:
                if self.headers.get("Authorization") != f"Basic {token}":
                    self.answer(401, {"type": "error", "code": "invalid_credentials"})
                    return False
                return True

            def do_GET(self) -> None:
                if not self.authorised():
                    return
                if (hold := stand_in.hold) is not None:
                    stand_in.held.set()
                    hold.wait(30)
                kind, _, ident = self.path.removeprefix("/v3/").partition("/")
                store = {"payments": stand_in.payments, "refunds": stand_in.refunds}.get(kind, {})
                with stand_in.lock:
                    found = store.get(ident)
                    if found is None:
                        self.answer(404, {"type": "error", "code": "not_found"})
                    else:
                        self.answer(200, dict(found))

            def do_POST(self) -> None:
                if not self.authorised():
                    return
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                key = self.headers.get("Idempotence-Key")
                if not key:
                    self.answer(400, {"type": "error", "code": "invalid_request", "parameter": "Idempotence-Key"})
                    return
                with stand_in.lock:
                    if self.path == "/v3/refunds":
                        stand_in.refund_posts.append((key, body))
                    if self.path == "/v3/refunds" and stand_in.lose_refunds > 0:  # made (or met), answer lost
                        stand_in.lose_refunds -= 1
                        if (self.path, key) not in stand_in.by_key:
                            stand_in.by_key[(self.path, key)] = stand_in.new_refund(body)
                        self.answer(504, {"type": "error", "code": "gateway_timeout"})
                        return
                    if (self.path, key) in stand_in.by_key:
                        self.answer(*stand_in.by_key[(self.path, key)])
                        return
                    if self.path == "/v3/payments":
                        if body.get("capture") is not True or body["confirmation"]["type"] != "redirect":
                            self.answer(400, {"type": "error", "code": "invalid_request"})
                            return
                        status, obj = stand_in.new_payment(body)
                    elif self.path == "/v3/refunds":
                        if stand_in.fail_refunds > 0:  # not remembered under the key: a retry is a new try
                            stand_in.fail_refunds -= 1
                            self.answer(500, {"type": "error", "code": "internal_server_error"})
                            return
                        status, obj = stand_in.new_refund(body)
                    else:
                        status, obj = 404, {"type": "error", "code": "not_found"}
                    stand_in.by_key[(self.path, key)] = (status, obj)
                    self.answer(status, obj)

            def log_message(self, *args: Any) -> None:
                return None

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v3"

    def new_payment(self, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        self.created.append(body)
        ident = str(uuid.uuid4())
        payment = {"id": ident, "status": "pending", "paid": False, "amount": body["amount"],
                   "description": body["description"], "metadata": body["metadata"], "refundable": False,
                   "created_at": dt.datetime.now(dt.UTC).isoformat(), "test": True,
                   "confirmation": {"type": "redirect",
                                    "confirmation_url": f"https://yoomoney.test/checkout/payments/v2/contract?orderId={ident}"}}
        self.payments[ident] = payment
        return 200, payment

    def new_refund(self, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        payment = self.payments.get(body["payment_id"])
        if payment is None or payment["status"] != "succeeded":
            return 400, {"type": "error", "code": "invalid_request", "parameter": "payment_id"}
        if Decimal(body["amount"]["value"]) > Decimal(payment["amount"]["value"]):
            return 400, {"type": "error", "code": "invalid_request", "parameter": "amount"}
        refund = {"id": str(uuid.uuid4()), "payment_id": payment["id"], "status": "succeeded", "amount": body["amount"],
                  "created_at": dt.datetime.now(dt.UTC).isoformat()}
        self.refunds[refund["id"]] = refund
        return 200, refund

    def set(self, payment_id: str, **fields: Any) -> None:
        with self.lock:
            self.payments[payment_id].update(fields)

    def succeed(self, payment_id: str) -> None:
        self.set(payment_id, status="succeeded", paid=True)


@pytest.fixture(scope="module")
def yookassa() -> Iterator[YooKassaStandIn]:
    stand_in = YooKassaStandIn()
    thread = threading.Thread(target=stand_in.server.serve_forever, daemon=True)
    thread.start()
    yield stand_in
    stand_in.server.shutdown()
    stand_in.server.server_close()


@pytest.fixture(scope="module")
async def online(test_settings: Settings, yookassa: YooKassaStandIn) -> AsyncIterator[AsyncTestClient[Any]]:
    """The API with YooKassa as its payment provider (on the same database as the other client)."""
    settings = msgspec.structs.replace(
        test_settings, payment_provider="yookassa", yookassa_shop_id=SHOP, yookassa_secret_key=SECRET,
        yookassa_api_url=yookassa.url, payment_return_url="https://clinic.test/paid", refund_retry_seconds=3600)
    async with running(settings) as client:
        yield client


def notification(payment_id: str, event: str = "payment.succeeded", **claims: Any) -> dict[str, Any]:
    return {"type": "notification", "event": event,
            "object": {"id": payment_id, "status": "succeeded", "paid": True, **claims}}


async def is_paid(client: AsyncTestClient[Any], who: Session, visit: dict[str, Any]) -> bool:
    answer = await client.get(f"/api/v1/consultations/{visit['id']}", headers=who.headers)
    assert answer.status_code == 200, answer.text
    return bool(answer.json()["paid"])


async def refunds_of(session_maker: Maker, visit: dict[str, Any]) -> list[Refund]:
    async with session_maker() as db:
        return list((await db.scalars(select(Refund).where(Refund.consultation_id == UUID(visit["id"])))).all())


async def paid_events(session_maker: Maker, visit: dict[str, Any]) -> int:
    async with session_maker() as db:
        rows = (await db.scalars(select(OutboxEvent).where(OutboxEvent.aggregate_id == UUID(visit["id"]),
                                                           OutboxEvent.type == "consultation.updated"))).all()
    return sum(r.payload["change"] == "paid" for r in rows)


async def drain(client: AsyncTestClient[Any]) -> int:
    """A round of the app's refund worker, run on the app's own event loop."""
    settled: int = await asyncio.to_thread(client.blocking_portal.call, client.app.state.refunds.drain)
    return settled


def ref() -> str:
    return f"desk-{secrets.token_hex(8)}"


# --- at the front desk ----------------------------------------------------------------------------


async def test_a_patient_cannot_record_a_payment_the_desk_takes_the_price_once(
    client: AsyncTestClient[Any], patient: Session, staff: Callable[..., Any], specialist: Callable[..., Any],
    service: Callable[..., Any], visit_until: Callable[..., Any], session_maker: Maker,
) -> None:
    doctor, registrar = await specialist(), await staff("registrar")
    svc = await service(price="3500.00")
    visit = await visit_until(patient, doctor, svc, nth=1)
    url = f"/api/v1/consultations/{visit['id']}/pay"

    refused(await client.post(url, headers=patient.headers, json={"amount": "0.01", "method": "card",
                                                                  "reference": ref()}), 403, "not_allowed")
    refused(await client.post(url, headers=patient.headers, json={"amount": "3500.00", "method": "card",
                                                                  "reference": ref()}), 403, "not_allowed")
    refused(await client.post(url, headers=doctor.headers, json={"method": "card", "reference": ref()}), 403)
    assert not await is_paid(client, patient, visit)
    wrong = await client.post(url, headers=registrar.headers, json={"amount": "0.01", "method": "cash",
                                                                    "reference": ref()})
    refused(wrong, 422, "amount_mismatch")
    assert wrong.json()["extra"]["price"] == "3500.00"
    refused(await client.post(url, headers=registrar.headers, json={"method": "online", "reference": ref()}),
            422, "invalid_input")  # online is paid through the provider, never recorded by hand
    assert not await is_paid(client, patient, visit)

    reference = ref()
    for _ in range(2):  # a retry of the same payment answers as before
        taken = await client.post(url, headers=registrar.headers, json={"method": "cash", "reference": reference})
        assert taken.status_code == 200, taken.text
        assert taken.json()["paid"] is True
    refused(await client.post(url, headers=registrar.headers, json={"amount": "3500.00", "method": "card",
                                                                    "reference": ref()}), 409, "already_paid")
    listed = await client.get(f"/api/v1/consultations/{visit['id']}/payments", headers=patient.headers)
    assert listed.status_code == 200, listed.text
    assert [(p["amount"], p["method"], p["status"], p["provider"]) for p in listed.json()["items"]] == [
        ("3500.00", "cash", "succeeded", None)]
    assert await paid_events(session_maker, visit) == 1
    refused(await client.get(f"/api/v1/consultations/{visit['id']}/payments", headers=doctor.headers),
            403, "not_allowed")


async def test_without_a_provider_online_payment_is_a_clear_refusal(
    client: AsyncTestClient[Any], patient: Session, specialist: Callable[..., Any], service: Callable[..., Any],
    visit_until: Callable[..., Any],
) -> None:
    visit = await visit_until(patient, await specialist(), await service(), nth=1)
    answer = await client.post(f"/api/v1/consultations/{visit['id']}/payments", headers=patient.headers)
    refused(answer, 409, "online_payment_unavailable")
    assert "front desk" in answer.json()["detail"]
    ignored = await client.post(NOTIFY, json=notification(str(uuid.uuid4())))
    assert ignored.status_code == 200, ignored.text
    assert ignored.json() == {"outcome": "ignored"}


async def test_a_cancelled_visit_paid_at_the_desk_owes_a_refund_the_desk_gives_back(
    client: AsyncTestClient[Any], patient: Session, staff: Callable[..., Any], specialist: Callable[..., Any],
    service: Callable[..., Any], visit_until: Callable[..., Any], session_maker: Maker,
) -> None:
    registrar = await staff("registrar")
    visit = await visit_until(patient, await specialist(), await service(price="2500.00"), nth=1)
    paid = await client.post(f"/api/v1/consultations/{visit['id']}/pay", headers=registrar.headers,
                             json={"amount": "2500.00", "method": "card", "reference": ref()})
    assert paid.status_code == 200, paid.text
    assert await refunds_of(session_maker, visit) == []
    cancelled = await client.post(f"/api/v1/consultations/{visit['id']}/cancel", headers=patient.headers)
    assert cancelled.status_code == 200, cancelled.text

    [refund] = await refunds_of(session_maker, visit)
    assert (refund.status, refund.amount, refund.provider) == ("due", Decimal("2500.00"), None)
    refused(await client.get("/api/v1/refunds", headers=patient.headers), 403)
    due = await client.get("/api/v1/refunds", headers=registrar.headers, params={"status": "due"})
    assert due.status_code == 200, due.text
    assert str(refund.id) in {r["id"] for r in due.json()["items"]}
    done = await client.post(f"/api/v1/refunds/{refund.id}/done", headers=registrar.headers)
    assert done.status_code == 200, done.text
    assert done.json()["status"] == "succeeded"
    [refund] = await refunds_of(session_maker, visit)
    assert (refund.status, refund.resolved_by) == ("succeeded", registrar.id)


# --- online, through YooKassa --------------------------------------------------------------------


async def test_online_payment_counts_only_as_the_provider_confirms_it(
    online: AsyncTestClient[Any], client: AsyncTestClient[Any], yookassa: YooKassaStandIn, patient: Session,
    staff: Callable[..., Any], specialist: Callable[..., Any], service: Callable[..., Any],
    visit_until: Callable[..., Any], login: Callable[[str], Any], new_phone: Callable[[], str],
    session_maker: Maker,
) -> None:
    doctor, registrar = await specialist(), await staff("registrar")
    stranger = await login(new_phone())
    visit = await visit_until(patient, doctor, await service(price="3500.00"), nth=1)
    url = f"/api/v1/consultations/{visit['id']}/payments"
    refused(await online.post(url, headers=stranger.headers), 404)
    refused(await online.get(url, headers=stranger.headers), 404)

    started = await online.post(url, headers=patient.headers)
    assert started.status_code == 201, started.text
    attempt = started.json()
    assert (attempt["consultation_id"], attempt["status"], attempt["amount"], attempt["provider"]) == (
        visit["id"], "pending", "3500.00", "yookassa")
    [provider_id] = [p for p, body in yookassa.payments.items() if body["metadata"]["consultation_id"] == visit["id"]]
    assert attempt["confirmation_url"] == yookassa.payments[provider_id]["confirmation"]["confirmation_url"]
    body = next(b for b in yookassa.created if b["metadata"]["consultation_id"] == visit["id"])
    assert body["amount"] == {"value": "3500.00", "currency": "RUB"}
    assert body["confirmation"]["return_url"] == "https://clinic.test/paid"
    assert body["metadata"] == {"consultation_id": visit["id"]}  # nothing personal or medical leaves
    assert body["description"] == Settings().payment_description

    again = await online.post(url, headers=patient.headers)  # a second tap: the same payment, not a new one
    assert again.status_code == 201, again.text
    assert again.json()["id"] == attempt["id"]
    assert sum(b["metadata"]["consultation_id"] == visit["id"] for b in yookassa.created) == 1

    # forged: an id the provider never issued, and ours while the provider still says pending
    for forged in (notification(str(uuid.uuid4())), notification(provider_id),
                   notification(provider_id, amount={"value": "3500.00", "currency": "RUB"})):
        answer = await online.post(NOTIFY, json=forged)
        assert answer.status_code == 200, answer.text
        assert answer.json() == {"outcome": "ignored"}
    assert not await is_paid(online, patient, visit)
    yookassa.succeed(provider_id)
    yookassa.set(provider_id, amount={"value": "35.00", "currency": "RUB"})  # succeeded, but not for our price
    assert (await online.post(NOTIFY, json=notification(provider_id))).json() == {"outcome": "ignored"}
    yookassa.set(provider_id, amount={"value": "3500.00", "currency": "RUB"}, metadata={"consultation_id": str(
        uuid.uuid4())})  # nor for this visit
    assert (await online.post(NOTIFY, json=notification(provider_id))).json() == {"outcome": "ignored"}
    assert not await is_paid(online, patient, visit)

    yookassa.set(provider_id, metadata={"consultation_id": visit["id"]})
    genuine = await online.post(NOTIFY, json=notification(provider_id))
    assert genuine.status_code == 200, genuine.text
    assert genuine.json() == {"outcome": "processed"}
    assert await is_paid(client, patient, visit)
    repeated = await online.post(NOTIFY, json=notification(provider_id))
    assert repeated.json() == {"outcome": "ignored"}
    assert await paid_events(session_maker, visit) == 1

    listed = await online.get(url, headers=registrar.headers)
    assert [(p["id"], p["status"], p["confirmation_url"]) for p in listed.json()["items"]] == [
        (attempt["id"], "succeeded", None)]
    refused(await online.post(url, headers=patient.headers), 409, "already_paid")
    refused(await client.post(f"/api/v1/consultations/{visit['id']}/pay", headers=registrar.headers,
                              json={"method": "card", "reference": ref()}), 409, "already_paid")
    gone = await visit_until(patient, doctor, await service(), nth=2)
    assert (await online.post(f"/api/v1/consultations/{gone['id']}/cancel", headers=patient.headers)).status_code == 200
    refused(await online.post(f"/api/v1/consultations/{gone['id']}/payments", headers=patient.headers),
            409, "transition_not_allowed")
    for malformed in ({"type": "notification"}, {"type": "other", "event": "payment.succeeded", "object": {"id": "x"}},
                      {"type": "notification", "event": "payment.succeeded", "object": {}}):
        refused(await online.post(NOTIFY, json=malformed), 422, "invalid_input")


async def test_a_cancelled_visit_paid_online_is_refunded_through_the_provider_once(
    online: AsyncTestClient[Any], yookassa: YooKassaStandIn, patient: Session, specialist: Callable[..., Any],
    service: Callable[..., Any], visit_until: Callable[..., Any], session_maker: Maker,
) -> None:
    visit = await visit_until(patient, await specialist(), await service(price="1800.00"), nth=1)
    started = await online.post(f"/api/v1/consultations/{visit['id']}/payments", headers=patient.headers)
    assert started.status_code == 201, started.text
    provider_id = next(p for p, b in yookassa.payments.items() if b["metadata"]["consultation_id"] == visit["id"])
    yookassa.succeed(provider_id)
    assert (await online.post(NOTIFY, json=notification(provider_id))).json() == {"outcome": "processed"}

    yookassa.fail_refunds = 1  # the first try meets a provider error: retried with the same key
    cancelled = await online.post(f"/api/v1/consultations/{visit['id']}/cancel", headers=patient.headers)
    assert cancelled.status_code == 200, cancelled.text
    [refund] = await refunds_of(session_maker, visit)
    assert (refund.amount, refund.provider) == (Decimal("1800.00"), "yookassa")
    await drain(online)  # after the worker's own round, if it is running one: rounds never overlap
    [refund] = await refunds_of(session_maker, visit)
    assert (refund.status, refund.attempts) == ("due", 1)
    async with session_maker() as db:  # let the backoff pass
        await db.execute(update(Refund).where(Refund.id == refund.id).values(
            next_attempt_at=dt.datetime.now(dt.UTC)))
        await db.commit()
    await drain(online)
    await drain(online)

    posts = [(key, body) for key, body in yookassa.refund_posts if body["payment_id"] == provider_id]
    assert [key for key, _ in posts] == [str(refund.id)] * 2  # the retry repeats the key
    assert posts[0][1]["amount"] == {"value": "1800.00", "currency": "RUB"}
    assert [r for r in yookassa.refunds.values() if r["payment_id"] == provider_id] != []
    assert sum(r["payment_id"] == provider_id for r in yookassa.refunds.values()) == 1  # given back once
    [refund] = await refunds_of(session_maker, visit)
    assert refund.status == "succeeded"
    assert refund.provider_refund_id is not None
    async with session_maker() as db:
        [payment] = (await db.scalars(select(Payment).where(Payment.consultation_id == UUID(visit["id"])))).all()
    assert (payment.status, payment.provider_payment_id) == ("succeeded", provider_id)



async def test_an_online_payment_for_a_visit_paid_at_the_desk_meanwhile_is_given_back(
    online: AsyncTestClient[Any], yookassa: YooKassaStandIn, patient: Session, staff: Callable[..., Any],
    specialist: Callable[..., Any], service: Callable[..., Any], visit_until: Callable[..., Any],
    session_maker: Maker,
) -> None:
    registrar = await staff("registrar")
    visit = await visit_until(patient, await specialist(), await service(price="1200.00"), nth=1)
    started = await online.post(f"/api/v1/consultations/{visit['id']}/payments", headers=patient.headers)
    assert started.status_code == 201, started.text
    desk = await online.post(f"/api/v1/consultations/{visit['id']}/pay", headers=registrar.headers,
                             json={"method": "card", "reference": ref()})
    assert desk.status_code == 200, desk.text
    provider_id = next(p for p, b in yookassa.payments.items() if b["metadata"]["consultation_id"] == visit["id"])
    yookassa.succeed(provider_id)  # the patient paid on the provider's page too
    assert (await online.post(NOTIFY, json=notification(provider_id))).json() == {"outcome": "ignored"}

    listed = (await online.get(f"/api/v1/consultations/{visit['id']}/payments", headers=patient.headers)).json()
    assert sorted((p["method"], p["status"]) for p in listed["items"]) == [("card", "succeeded"),
                                                                           ("online", "duplicate")]
    assert await paid_events(session_maker, visit) == 1
    [refund] = await refunds_of(session_maker, visit)
    assert (refund.provider, refund.amount) == ("yookassa", Decimal("1200.00"))
    await drain(online)
    [refund] = await refunds_of(session_maker, visit)
    assert refund.status == "succeeded"
    assert [b["payment_id"] for _, b in yookassa.refund_posts].count(provider_id) == 1


async def test_a_payment_the_provider_cancelled_makes_way_for_a_new_one(
    online: AsyncTestClient[Any], yookassa: YooKassaStandIn, patient: Session, specialist: Callable[..., Any],
    service: Callable[..., Any], visit_until: Callable[..., Any],
) -> None:
    visit = await visit_until(patient, await specialist(), await service(), nth=1)
    url = f"/api/v1/consultations/{visit['id']}/payments"
    first = (await online.post(url, headers=patient.headers)).json()
    [old] = [p for p, b in yookassa.payments.items() if b["metadata"]["consultation_id"] == visit["id"]]
    yookassa.set(old, status="canceled")  # the payer gave up on the provider's page, its notification lost
    second = await online.post(url, headers=patient.headers)
    assert second.status_code == 201, second.text
    assert second.json()["id"] != first["id"]
    assert second.json()["status"] == "pending"
    mine = [p for p, b in yookassa.payments.items() if b["metadata"]["consultation_id"] == visit["id"]]
    assert len(mine) == 2
    listed = (await online.get(url, headers=patient.headers)).json()["items"]
    assert [(p["id"], p["status"]) for p in listed] == [(first["id"], "canceled"), (second.json()["id"], "pending")]
    [new] = [p for p in mine if p != old]
    yookassa.succeed(new)
    assert (await online.post(NOTIFY, json=notification(old))).json() == {"outcome": "ignored"}
    assert (await online.post(NOTIFY, json=notification(new))).json() == {"outcome": "processed"}
    assert await is_paid(online, patient, visit)

async def test_the_adapter_speaks_yookassas_api_with_its_credentials_and_idempotence_keys(
    test_settings: Settings, yookassa: YooKassaStandIn,
) -> None:
    settings = msgspec.structs.replace(test_settings, payment_provider="yookassa", yookassa_shop_id=SHOP,
                                       yookassa_secret_key=SECRET, yookassa_api_url=yookassa.url)
    provider = YooKassa(settings)
    try:
        key, metadata = str(uuid.uuid4()), {"consultation_id": str(uuid.uuid4())}
        first = await provider.create_payment(key, Decimal("990.00"), "RUB", "x", metadata, "https://clinic.test/")
        again = await provider.create_payment(key, Decimal("990.00"), "RUB", "x", metadata, "https://clinic.test/")
        assert again.id == first.id  # a repeated call meets the same payment
        other = await provider.create_payment(str(uuid.uuid4()), Decimal("990.00"), "RUB", "x", metadata,
                                              "https://clinic.test/")
        assert other.id != first.id
        fetched = await provider.get_payment(first.id)
        assert fetched is not None
        assert (fetched.status, fetched.paid, fetched.amount, fetched.currency, fetched.metadata) == (
            "pending", False, Decimal("990.00"), "RUB", metadata)
        assert await provider.get_payment(str(uuid.uuid4())) is None
    finally:
        await provider.aclose()
    wrong = YooKassa(msgspec.structs.replace(settings, yookassa_secret_key="not-the-key"))
    try:
        with pytest.raises(ProviderError) as refusal:
            await wrong.get_payment(first.id)
        assert refusal.value.retryable is False
    finally:
        await wrong.aclose()


# --- refunds never paid twice; races; the provider outside transactions ---------------------------


async def paid_online(online: AsyncTestClient[Any], yookassa: YooKassaStandIn, patient: Session,
                      visit: dict[str, Any]) -> str:
    """The visit paid online, as the provider confirms it; answers the provider's payment id."""
    started = await online.post(f"/api/v1/consultations/{visit['id']}/payments", headers=patient.headers)
    assert started.status_code == 201, started.text
    provider_id = next(p for p, b in yookassa.payments.items() if b["metadata"]["consultation_id"] == visit["id"])
    yookassa.succeed(provider_id)
    assert (await online.post(NOTIFY, json=notification(provider_id))).json() == {"outcome": "processed"}
    return provider_id


async def due_now(session_maker: Maker, refund: Refund) -> None:
    """Lets the refund's backoff pass."""
    async with session_maker() as db:
        await db.execute(update(Refund).where(Refund.id == refund.id).values(next_attempt_at=dt.datetime.now(dt.UTC)))
        await db.commit()


async def test_a_refund_whose_answer_was_lost_is_asked_again_never_left_to_the_desk(
    online: AsyncTestClient[Any], yookassa: YooKassaStandIn, patient: Session, staff: Callable[..., Any],
    specialist: Callable[..., Any], service: Callable[..., Any], visit_until: Callable[..., Any],
    session_maker: Maker, test_settings: Settings,
) -> None:
    registrar = await staff("registrar")
    visit = await visit_until(patient, await specialist(), await service(price="2100.00"), nth=1)
    provider_id = await paid_online(online, yookassa, patient, visit)
    # the provider makes the refund, but every answer is lost, more times than the attempts once allowed
    # (the app's own refund task may try too, in between: it only adds attempts)
    yookassa.lose_refunds = 1_000_000
    cancelled = await online.post(f"/api/v1/consultations/{visit['id']}/cancel", headers=patient.headers)
    assert cancelled.status_code == 200, cancelled.text
    for _ in range(test_settings.refund_max_attempts + 1):
        [refund] = await refunds_of(session_maker, visit)
        await due_now(session_maker, refund)
        await drain(online)
    [refund] = await refunds_of(session_maker, visit)
    assert refund.status == "due"  # still asked; the provider may well have made it
    assert refund.attempts >= test_settings.refund_max_attempts + 1
    refused(await online.post(f"/api/v1/refunds/{refund.id}/done", headers=registrar.headers),
            409, "refund_by_provider")
    yookassa.lose_refunds = 0  # the provider answers again

    await due_now(session_maker, refund)
    await drain(online)  # the same key meets the refund made: succeeded (by this drain or the app's task)
    [refund] = await refunds_of(session_maker, visit)
    assert refund.status == "succeeded"
    assert {key for key, b in yookassa.refund_posts if b["payment_id"] == provider_id} == {str(refund.id)}
    assert sum(r["payment_id"] == provider_id for r in yookassa.refunds.values()) == 1


async def test_the_desk_settles_a_failed_provider_refund_only_once_the_provider_has_none(
    online: AsyncTestClient[Any], yookassa: YooKassaStandIn, patient: Session, staff: Callable[..., Any],
    specialist: Callable[..., Any], service: Callable[..., Any], visit_until: Callable[..., Any],
    session_maker: Maker,
) -> None:
    registrar = await staff("registrar")
    made, refused_there = [await visit_until(patient, await specialist(), await service(price="900.00"), nth=n)
                           for n in (1, 2)]
    made_id = await paid_online(online, yookassa, patient, made)
    refused_id = await paid_online(online, yookassa, patient, refused_there)
    yookassa.set(refused_id, status="canceled")  # the provider will refuse to give this one back
    yookassa.lose_refunds = 1  # made at the provider, the answer lost
    for visit in (made, refused_there):
        cancelled = await online.post(f"/api/v1/consultations/{visit['id']}/cancel", headers=patient.headers)
        assert cancelled.status_code == 200, cancelled.text
    [lost] = await refunds_of(session_maker, made)
    [no] = await refunds_of(session_maker, refused_there)
    await drain(online)
    [no] = await refunds_of(session_maker, refused_there)
    assert no.status == "failed"  # a refusal is final
    async with session_maker() as db:  # marked failed as an earlier version did after its attempts
        await db.execute(update(Refund).where(Refund.id == lost.id).values(status="failed", next_attempt_at=None))
        await db.commit()

    answer = await online.post(f"/api/v1/refunds/{lost.id}/done", headers=registrar.headers)
    refused(answer, 409, "refunded_by_provider")
    [lost] = await refunds_of(session_maker, made)
    assert (lost.status, lost.resolved_by) == ("succeeded", None)  # by the provider, not by hand
    assert sum(r["payment_id"] == made_id for r in yookassa.refunds.values()) == 1

    done = await online.post(f"/api/v1/refunds/{no.id}/done", headers=registrar.headers)
    assert done.status_code == 200, done.text
    [no] = await refunds_of(session_maker, refused_there)
    assert (no.status, no.resolved_by) == ("succeeded", registrar.id)
    assert not any(r["payment_id"] == refused_id for r in yookassa.refunds.values())


def notify_aside(client: AsyncTestClient[Any], provider_id: str) -> asyncio.Future[Any]:
    """The notification sent from another thread: the test client's calls block the loop they are made on."""
    return asyncio.ensure_future(asyncio.to_thread(
        lambda: asyncio.run(client.post(NOTIFY, json=notification(provider_id)))))


async def wait_blocked(session_maker: Maker, statement: str) -> None:
    """PostgreSQL: until a backend waits on a row lock running `statement...` (SQLite has one writer)."""
    if not POSTGRES:
        return
    for _ in range(1000):
        async with session_maker() as db:
            if await db.scalar(text("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                                    "AND wait_event_type = 'Lock' AND query ILIKE :q"), {"q": f"{statement}%"}):
                return
        await asyncio.sleep(0.01)
    raise AssertionError(f"nothing waited on {statement!r}")


async def test_a_payment_confirmed_while_the_visit_is_being_cancelled_is_owed_back(
    online: AsyncTestClient[Any], yookassa: YooKassaStandIn, patient: Session, specialist: Callable[..., Any],
    service: Callable[..., Any], visit_until: Callable[..., Any], session_maker: Maker,
) -> None:
    visit = await visit_until(patient, await specialist(), await service(price="1300.00"), nth=1)
    started = await online.post(f"/api/v1/consultations/{visit['id']}/payments", headers=patient.headers)
    assert started.status_code == 201, started.text
    provider_id = next(p for p, b in yookassa.payments.items() if b["metadata"]["consultation_id"] == visit["id"])
    yookassa.succeed(provider_id)
    async with session_maker() as cancel:  # a cancel under way: it has seen the visit unpaid, not committed yet
        await cancel.execute(update(Consultation).where(Consultation.id == UUID(visit["id"]))
                             .values(status="cancelled"))
        notified = notify_aside(online, provider_id)
        await wait_blocked(session_maker, "UPDATE consultation")
        await cancel.commit()
    assert (await notified).json() == {"outcome": "processed"}
    [refund] = await refunds_of(session_maker, visit)  # the refund task may have sent it already
    assert refund.status in ("due", "pending", "succeeded"), refund.status
    assert (refund.amount, refund.provider) == (Decimal("1300.00"), "yookassa")


async def test_no_connection_is_held_in_a_transaction_while_the_provider_answers_a_notification(
    online: AsyncTestClient[Any], yookassa: YooKassaStandIn, patient: Session, specialist: Callable[..., Any],
    service: Callable[..., Any], visit_until: Callable[..., Any], session_maker: Maker,
) -> None:
    visit = await visit_until(patient, await specialist(), await service(price="1400.00"), nth=1)
    started = await online.post(f"/api/v1/consultations/{visit['id']}/payments", headers=patient.headers)
    assert started.status_code == 201, started.text
    provider_id = next(p for p, b in yookassa.payments.items() if b["metadata"]["consultation_id"] == visit["id"])
    yookassa.succeed(provider_id)
    yookassa.held.clear()
    yookassa.hold = threading.Event()
    try:
        notified = notify_aside(online, provider_id)
        assert await asyncio.to_thread(yookassa.held.wait, 10)
        async with session_maker() as db:  # the provider is slow: what the request holds meanwhile
            if POSTGRES:
                idle = await db.scalar(text(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                    "AND state LIKE 'idle in transaction%' AND query ILIKE '%FROM payment%'"))
                assert idle == 0
            # nor does it keep a change to the visit waiting
            await db.execute(update(Consultation).where(Consultation.id == UUID(visit["id"]))
                             .values(updated_at=dt.datetime.now(dt.UTC)))
            await db.commit()
    finally:
        yookassa.hold.set()
        yookassa.hold = None
    assert (await notified).json() == {"outcome": "processed"}
    assert await is_paid(online, patient, visit)


# --- the 0004 migration -----------------------------------------------------------------------------


async def test_the_payments_migration_voids_payments_the_rules_refuse(tmp_path: Path) -> None:
    url = await fresh_database_url(tmp_path, f"payments_{secrets.token_hex(4)}")
    await asyncio.to_thread(upgrade, url, "0003")
    meta = sa.MetaData()
    json_ = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
    def stamps() -> list[sa.Column[Any]]:
        return [sa.Column("created_at", DateTimeUTC(timezone=True)),
                sa.Column("updated_at", DateTimeUTC(timezone=True))]

    users = sa.Table("user_account", meta, sa.Column("id", GUID), sa.Column("full_name", sa.String),
                     sa.Column("timezone", sa.String), sa.Column("roles", json_), sa.Column("specialties", json_),
                     sa.Column("is_staff", sa.Boolean), sa.Column("questionnaire", json_),
                     sa.Column("guardian_id", GUID), *stamps())
    services = sa.Table("clinic_service", meta, sa.Column("id", GUID), sa.Column("specialty", sa.String),
                        sa.Column("title", sa.String), sa.Column("duration_minutes", sa.Integer),
                        sa.Column("price", sa.Numeric(10, 2)), sa.Column("in_person_only", sa.Boolean),
                        sa.Column("stage", sa.String), sa.Column("active", sa.Boolean), *stamps())
    slots = sa.Table("slot", meta, sa.Column("id", GUID), sa.Column("specialist_id", GUID),
                     sa.Column("starts_at", DateTimeUTC(timezone=True)),
                     sa.Column("ends_at", DateTimeUTC(timezone=True)), *stamps())
    visits = sa.Table("consultation", meta, sa.Column("id", GUID), sa.Column("patient_id", GUID),
                      sa.Column("specialist_id", GUID), sa.Column("service_id", GUID), sa.Column("slot_id", GUID),
                      sa.Column("specialty", sa.String), sa.Column("starts_at", DateTimeUTC(timezone=True)),
                      sa.Column("ends_at", DateTimeUTC(timezone=True)), sa.Column("format", sa.String),
                      sa.Column("status", sa.String), sa.Column("paid", sa.Boolean), sa.Column("booked_by", GUID),
                      *stamps())
    payments = sa.Table("payment", meta, sa.Column("id", GUID), sa.Column("consultation_id", GUID),
                        sa.Column("amount", sa.Numeric(10, 2)), sa.Column("method", sa.String),
                        sa.Column("reference", sa.String), sa.Column("recorded_by", GUID),
                        sa.Column("status", sa.String), *stamps())  # status: from 0004 on
    now = dt.datetime(2026, 11, 30, 9, 0, tzinfo=dt.UTC)
    ids = {name: uuid.uuid4() for name in ("guardian", "patient", "child", "doctor", "desk", "service")}

    def person(name: str, guardian: UUID | None = None) -> dict[str, Any]:
        return {"id": ids[name], "full_name": name, "timezone": "Europe/Moscow", "roles": [], "specialties": [],
                "is_staff": name in ("doctor", "desk"), "questionnaire": {}, "guardian_id": guardian,
                "created_at": now, "updated_at": now}

    # each visit: who it is for and its desk-recorded payments in order (recorded by, amount)
    cases: dict[str, tuple[str, list[tuple[str, str]]]] = {
        "by_patient": ("patient", [("patient", "1000.00")]),
        "by_guardian": ("child", [("guardian", "1000.00")]),
        "wrong_then_right": ("patient", [("desk", "1.00"), ("desk", "1000.00")]),
        "forged_then_right": ("patient", [("patient", "1000.00"), ("desk", "1000.00")]),
        "twice": ("patient", [("desk", "1000.00"), ("desk", "1000.00")]),
    }
    engine = create_async_engine(url)
    try:
        async with engine.begin() as conn:
            await conn.execute(users.insert(), [person("guardian"), person("patient"), person("doctor"),
                                                person("desk")])
            await conn.execute(users.insert(), [person("child", ids["guardian"])])
            await conn.execute(services.insert(), [{
                "id": ids["service"], "specialty": "therapist", "title": "visit", "duration_minutes": 30,
                "price": Decimal("1000.00"), "in_person_only": False, "stage": "primary", "active": True,
                "created_at": now, "updated_at": now}])
            for n, (case, (whose, paid_by)) in enumerate(cases.items()):
                ids[case], slot = uuid.uuid4(), uuid.uuid4()
                starts = now + dt.timedelta(hours=n + 1)
                await conn.execute(slots.insert(), [{"id": slot, "specialist_id": ids["doctor"], "starts_at": starts,
                                                     "ends_at": starts + dt.timedelta(minutes=30),
                                                     "created_at": now, "updated_at": now}])
                await conn.execute(visits.insert(), [{
                    "id": ids[case], "patient_id": ids[whose], "specialist_id": ids["doctor"],
                    "service_id": ids["service"], "slot_id": slot, "specialty": "therapist", "starts_at": starts,
                    "ends_at": starts + dt.timedelta(minutes=30), "format": "in_person", "status": "confirmed",
                    "paid": True, "booked_by": ids[whose], "created_at": now, "updated_at": now}])
                await conn.execute(payments.insert(), [{
                    "id": uuid.uuid4(), "consultation_id": ids[case], "amount": Decimal(amount), "method": "cash",
                    "reference": f"{case}-{i}", "recorded_by": ids[by], "created_at": now + dt.timedelta(minutes=i),
                    "updated_at": now} for i, (by, amount) in enumerate(paid_by)])
        await asyncio.to_thread(upgrade, url)
        async with engine.connect() as conn:
            found = {case: (list((await conn.scalars(select(payments.c.status).where(
                payments.c.consultation_id == ids[case]).order_by(payments.c.created_at))).all()),
                await conn.scalar(select(visits.c.paid).where(visits.c.id == ids[case]))) for case in cases}
    finally:
        await engine.dispose()
    assert found == {
        "by_patient": (["void"], False),
        "by_guardian": (["void"], False),
        "wrong_then_right": (["void", "succeeded"], True),
        "forged_then_right": (["void", "succeeded"], True),
        "twice": (["succeeded", "duplicate"], True),
    }
