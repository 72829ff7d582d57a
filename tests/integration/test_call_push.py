"""A call rings sockets and, when none is in the foreground, phones: FCM high-priority data on Android, APNs VoIP on
iOS, carrying only `{type, ref}` and living no longer than the ring; `delivered_via` says which; a call answered or
ended is never pushed. The API runs on a database of its own with its outbox worker sending to the stand-ins."""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest
import websockets
from litestar.testing import AsyncTestClient
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker, create_async_engine

from app.settings import Settings
from tests.conftest import Session, migrated_database_url, running
from tests.e2e.test_gateway import nothing_pending, ws_url
from tests.integration.test_calls import act, online_visit, start
from tests.integration.test_outbox_worker import device, idle, own_settings, pushes_to, sockets_at, stage, to
from tests.standins.apns import ApnsStandin
from tests.standins.fixtures import FcmFixture

Maker = async_sessionmaker[AsyncSession]
RING = 30  # seconds a call rings in this world


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
async def database_url(data_dir: Path) -> str:
    url = await migrated_database_url(data_dir, "calls")
    return url


@pytest.fixture(scope="module")
def test_settings(data_dir: Path, database_url: str, fcm: FcmFixture, apns: ApnsStandin) -> Settings:
    return apns.settings(fcm.settings(own_settings(data_dir, database_url), outbox_poll_seconds=0.2,
                                      call_ring_seconds=RING))


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
async def visit(patient: Session, specialist: Callable[..., Any], service: Callable[..., Any],
                visit_until: Callable[..., Any]) -> Any:
    return await online_visit(patient, await specialist(), service, visit_until)


async def test_an_offline_patient_is_rung_by_a_high_priority_data_push_with_ids_only(
    client: AsyncTestClient[Any], fcm: FcmFixture, visit: Any,
) -> None:
    token = await device(client, visit.patient)
    before = time.time()
    started = await start(client, visit)
    assert started["delivered_via"] == "push"  # no socket open
    [ring] = await pushes_to(fcm, token, kind="call.incoming")
    sent = ring.message
    assert sent["data"] == {"type": "call.incoming", "ref": started["id"]}  # no name, no specialty, nothing else
    assert "notification" not in sent  # a data message: the app rings itself
    assert sent["android"]["priority"] == "high"
    ttl = int(sent["android"]["ttl"].removesuffix("s"))
    assert 1 <= ttl <= RING  # never rings after the ring window
    expires = int(sent["apns"]["headers"]["apns-expiration"])
    assert expires <= before + RING + 1


async def test_an_iphone_with_a_voip_token_rings_through_apns_voip(
    client: AsyncTestClient[Any], fcm: FcmFixture, apns: ApnsStandin, visit: Any,
) -> None:
    voip = secrets.token_hex(32)
    fcm_token = f"ios-{secrets.token_hex(8)}"
    answer = await client.post("/api/v1/devices", headers=visit.patient.headers,
                               json={"platform": "ios", "push_token": fcm_token, "voip_token": voip})
    assert answer.status_code in (200, 201), answer.text
    before = int(time.time())
    started = await start(client, visit)
    assert started["delivered_via"] == "push"

    def rung() -> list[Any]:
        return [r for r in apns.requests if r.device_token == voip]

    for _ in range(500):
        if rung():
            break
        await asyncio.sleep(0.02)
    [ring] = rung()
    assert ring.body == {"aps": {}, "type": "call.incoming", "ref": started["id"]}
    assert ring.headers["apns-push-type"] == "voip"
    assert ring.headers["apns-priority"] == "10"
    assert ring.headers["apns-topic"] == f"{apns.topic}.voip"
    assert before < int(ring.headers["apns-expiration"]) <= before + RING + 1
    assert to(fcm, fcm_token, "call.incoming") == []  # the call went to PushKit, not through FCM


async def test_delivered_via_says_how_the_call_reached_the_patient(
    client: AsyncTestClient[Any], fcm: FcmFixture, visit: Any, patient: Session, specialist: Callable[..., Any],
    service: Callable[..., Any], visit_until: Callable[..., Any],
) -> None:
    # no socket and no device: nothing can ring
    started = await start(client, visit)
    assert started["delivered_via"] == "none"
    await act(client, visit.doctor, started["id"], "end")

    token = await device(client, visit.patient)
    async with sockets_at(client) as url, websockets.connect(ws_url(url, visit.patient)) as socket:
        await nothing_pending(socket)  # connected: in the foreground
        shown = await start(client, visit)
        assert shown["delivered_via"] == "websocket"
        await act(client, visit.doctor, shown["id"], "end")
        await idle(client)
        assert to(fcm, token, "call.incoming") == []  # it rang on the screen: no push

        await socket.send(json.dumps({"type": "presence", "data": {"state": "background"}}))
        await nothing_pending(socket)
        hidden = await start(client, visit)
        assert hidden["delivered_via"] == "both"  # the socket rings and so does the phone
        [ring] = await pushes_to(fcm, token, kind="call.incoming")
        assert ring.message["data"]["ref"] == hidden["id"]
        await act(client, visit.doctor, hidden["id"], "end")

    after = await start(client, visit)  # the socket has closed: only the push
    assert after["delivered_via"] == "push"


async def test_a_call_answered_or_ended_is_never_pushed(
    client: AsyncTestClient[Any], fcm: FcmFixture, visit: Any, session_maker: Maker,
) -> None:
    token = await device(client, visit.patient)
    async with sockets_at(client) as url, websockets.connect(ws_url(url, visit.patient)) as socket:
        await nothing_pending(socket)
        answered = await start(client, visit)  # shown on the screen: nothing staged for the phone
        assert (await act(client, visit.patient, answered["id"], "accept")).status_code == 200
        await act(client, visit.patient, answered["id"], "end")
        cancelled = await start(client, visit)
        await act(client, visit.doctor, cancelled["id"], "end")
    # the worker comes to a call's push late (a backlog, a restart): by then the call is over
    future = time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime(time.time() + RING))
    for call in (answered, cancelled):
        await stage(session_maker, "call.incoming", UUID(call["id"]), [visit.patient.id],
                    {"ref": call["id"], "ring_until": future})
    await idle(client)
    assert to(fcm, token, "call.incoming") == []
