"""The call rules around the call itself: a call ends with its consultation, who may send media into it, an offer
racing the call's end, the keeper leaving calls of nodes it cannot judge alone, ends that never wait on a node, and
the keeper's batches costing a fixed number of statements. Rooms on a stand-in SFU node (a real HTTP server the
test holds at will) where the node's timing matters."""

from __future__ import annotations

import asyncio
import datetime as dt
import socket
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager, suppress
from typing import Any, TypeVar
from uuid import UUID

import httpx
import msgspec
import pytest
import uvicorn
from litestar.testing import AsyncTestClient
from sqlalchemy import event, select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.chat.models import Conversation, UserEvent
from app.rtc.models import Call
from app.rtc.placement import NodeStatus
from app.services import calls_for
from app.settings import Settings
from tests.conftest import Session, refused, running
from tests.integration.test_calls import Visit, act, events, offer_sdp, online_visit, start
from tests.integration.test_outbox_worker import sockets_at
from tests.sfu_nodes import SECRET, node_server

Maker = async_sessionmaker[AsyncSession]
T = TypeVar("T")
WAIT = 30.0  # seconds an answer may take on a busy machine before the test calls it a hang


@pytest.fixture
async def visit(patient: Session, specialist: Callable[..., Any], service: Callable[..., Any],
                visit_until: Callable[..., Any]) -> Visit:
    return await online_visit(patient, await specialist(), service, visit_until)


async def on_app_loop(client: AsyncTestClient[Any], work: Coroutine[Any, Any, T]) -> T:
    """Run `work` on the app's own event loop (its database connections live there)."""
    loop = client.app.state.call_keeper._loop
    return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(work, loop))


async def call_of(session_maker: Maker, call_id: str) -> Call:
    async with session_maker() as session:
        call = await session.get(Call, UUID(call_id))
    assert call is not None
    return call


# --- a call ends with its consultation ---------------------------------------------------------------


async def test_a_call_of_a_cancelled_consultation_is_refused_and_the_sweep_ends_it(
    client: AsyncTestClient[Any], patient: Session, specialist: Callable[..., Any], service: Callable[..., Any],
    visit_until: Callable[..., Any], session_maker: Maker,
) -> None:
    doctor = await specialist()
    visit = await online_visit(patient, doctor, service, visit_until)
    ringing = await start(client, visit)
    assert (await client.post(f"/api/v1/consultations/{visit.id}/cancel", headers=patient.headers)).status_code == 200
    refused(await act(client, patient, ringing["id"], "accept"), 409, "consultation_over")
    refused(await client.post(f"/api/v1/calls/{ringing['id']}/rtc/offer", headers=doctor.headers,
                              json={"sdp": await offer_sdp(), "type": "offer"}), 409, "consultation_over")
    refused(await client.post(f"/api/v1/calls/{ringing['id']}/media", headers=doctor.headers,
                              json={"audio": True, "video": False}), 409, "consultation_over")

    answered = await online_visit(patient, doctor, service, visit_until, nth=3)
    active = await start(client, answered)
    assert (await act(client, patient, active["id"], "accept")).status_code == 200
    over = await client.post(f"/api/v1/consultations/{answered.id}/cancel", headers=patient.headers)
    assert over.status_code == 200, over.text
    refused(await client.post(f"/api/v1/calls/{active['id']}/rtc/offer", headers=patient.headers,
                              json={"sdp": await offer_sdp(), "type": "offer"}), 409, "consultation_over")

    # the sweep, run now; the keeper's own (every SWEEP_SECONDS) may have ended one of them first: either way
    # each is ended, with its reason, and announced once
    await on_app_loop(client, client.app.state.call_keeper.end_over())
    for call_id, reason in ((ringing["id"], "cancelled"), (active["id"], "completed")):
        call = await call_of(session_maker, call_id)
        assert (call.state, call.end_reason) == ("ended", reason)
        for who in (patient.id, doctor.id):
            [seen] = await events(session_maker, who, "call.ended", call_id)
            assert seen["end_reason"] == reason
    refused(await act(client, patient, ringing["id"], "accept"), 409, "call_not_ringing")


# --- who sends media into a call ---------------------------------------------------------------------


async def test_only_the_specialist_offers_while_it_rings_and_then_only_the_one_who_answered(
    client: AsyncTestClient[Any], visit: Visit, login: Callable[[str], Any], new_phone: Callable[[], str],
    session_maker: Maker,
) -> None:
    beside = await login(new_phone())  # a grown dependent's guardian: on the patient's side of the conversation
    async with session_maker() as session:
        await session.execute(update(Conversation).where(Conversation.id == UUID(visit.conversation_id))
                              .values(guardian_id=beside.id))
        await session.commit()
    started = await start(client, visit)
    url = f"/api/v1/calls/{started['id']}/rtc/offer"
    sdp = await offer_sdp()
    refused(await client.post(url, headers=visit.patient.headers, json={"sdp": sdp, "type": "offer"}), 409,
            "call_not_active")  # not before accepting: the doctor would still see it ringing
    answered = await client.post(url, headers=visit.doctor.headers, json={"sdp": sdp, "type": "offer"})
    assert answered.status_code == 200, answered.text
    assert (await act(client, visit.patient, started["id"], "accept")).status_code == 200
    refused(await client.post(url, headers=beside.headers, json={"sdp": sdp, "type": "offer"}), 403, "not_allowed")
    joined = await client.post(url, headers=visit.patient.headers, json={"sdp": await offer_sdp(), "type": "offer"})
    assert joined.status_code == 200, joined.text
    assert (await act(client, visit.doctor, started["id"], "end")).status_code == 200


# --- a stand-in SFU node the test holds --------------------------------------------------------------


class StandIn:
    """An SFU node's control interface on real HTTP whose offers and room closes wait until the test lets them
    go; `log` is what it saw, in order."""

    def __init__(self) -> None:
        self.name = ""
        self.log: list[str] = []
        self.offered, self.let_offer = asyncio.Event(), asyncio.Event()
        self.deleting, self.let_delete = asyncio.Event(), asyncio.Event()
        self.let_delete.set()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        assert scope["type"] == "http"
        while (await receive()).get("more_body"):
            pass
        status, body = 404, b""
        if scope["path"] == "/health":
            status, body = 200, msgspec.json.encode(NodeStatus(node=self.name, rooms=0, participants=0, streams=0))
        elif scope["method"] == "POST" and scope["path"].endswith("/offer"):
            self.log.append("offer")
            self.offered.set()
            await self.let_offer.wait()
            self.log.append("answered")
            status, body = 200, msgspec.json.encode({"sdp": "v=0\r\n", "type": "answer"})
        elif scope["method"] == "DELETE":
            self.log.append("delete")
            self.deleting.set()
            await self.let_delete.wait()
            self.log.append("deleted")
            status = 204
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": body})


@asynccontextmanager
async def with_stand_in(settings: Settings) -> AsyncIterator[tuple[StandIn, AsyncTestClient[Any], httpx.AsyncClient]]:
    """The stand-in node, an API instance placing rooms on it (no registry: it asks the node directly), and an
    HTTP client to that instance on a real listener. The node and the listener run on the app's event loop (the
    test client's requests hold the test's loop while they run)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    url = f"http://127.0.0.1:{listener.getsockname()[1]}"
    node = StandIn()
    node.name = f"{url}#standin"
    api = msgspec.structs.replace(settings, sfu_urls=url, sfu_secret=SECRET, redis_url=None,
                                  sfu_timeout_seconds=120.0, call_node_check_seconds=600.0)
    server = uvicorn.Server(uvicorn.Config(node, lifespan="off", log_config=None, access_log=False))
    async with running(api) as client:
        loop = client.app.state.call_keeper._loop
        serving = asyncio.run_coroutine_threadsafe(server.serve(sockets=[listener]), loop)
        try:
            async with sockets_at(client) as base, httpx.AsyncClient(base_url=base, timeout=WAIT) as http:
                yield node, client, http
        finally:
            loop.call_soon_threadsafe(node.let_offer.set)
            loop.call_soon_threadsafe(node.let_delete.set)
            server.should_exit = True
            with suppress(asyncio.CancelledError):
                await asyncio.wrap_future(serving)
            listener.close()


def let(client: AsyncTestClient[Any], gate: asyncio.Event, go: bool = True) -> None:
    """Open (or close) one of the stand-in's gates, from the test's loop."""
    client.app.state.call_keeper._loop.call_soon_threadsafe(gate.set if go else gate.clear)


async def post(http: httpx.AsyncClient, who: Session, path: str, **body: Any) -> httpx.Response:
    return await http.post(path, headers=who.headers, **({"json": body} if body else {}))


async def test_an_offer_answered_after_the_call_ended_closes_the_room_again(
    test_settings: Settings, visit: Visit,
) -> None:
    async with with_stand_in(test_settings) as (node, client, http):
        started = await post(http, visit.doctor, f"/api/v1/consultations/{visit.id}/calls")
        assert started.status_code == 201, started.text
        call_id = started.json()["id"]
        offering = asyncio.create_task(post(http, visit.doctor, f"/api/v1/calls/{call_id}/rtc/offer",
                                            sdp=await offer_sdp(), type="offer"))
        await on_app_loop(client, node.offered.wait())  # the node holds the offer: the call ends meanwhile
        assert (await post(http, visit.doctor, f"/api/v1/calls/{call_id}/end")).status_code == 200
        await on_app_loop(client, client.app.state.call_keeper.closed())
        assert node.log == ["offer", "delete", "deleted"]
        let(client, node.let_offer)  # the node answers, having made the room again
        refused(await offering, 409, "call_ended")
        assert node.log[2:] == ["deleted", "answered", "delete", "deleted"]  # and it was closed again


async def test_the_end_of_a_call_reaches_people_while_the_node_still_closes_the_room(
    test_settings: Settings, visit: Visit, session_maker: Maker,
) -> None:
    async with with_stand_in(test_settings) as (node, client, http):
        started = await post(http, visit.doctor, f"/api/v1/consultations/{visit.id}/calls")
        assert started.status_code == 201, started.text
        call_id = started.json()["id"]
        let(client, node.let_delete, go=False)  # the node takes its time closing the room
        ending = asyncio.create_task(post(http, visit.doctor, f"/api/v1/calls/{call_id}/end"))
        await on_app_loop(client, node.deleting.wait())
        answer = await asyncio.wait_for(ending, WAIT)  # not held until the node answers (SFU_TIMEOUT_SECONDS)
        assert answer.status_code == 200, answer.text
        assert node.log == ["delete"]  # still closing
        for who in (visit.doctor.id, visit.patient.id):
            [ended] = await events(session_maker, who, "call.ended", call_id)
            assert ended["end_reason"] == "cancelled"
        let(client, node.let_delete)
        await on_app_loop(client, client.app.state.call_keeper.closed())  # the keeper saw the close through
        assert node.log == ["delete", "deleted"]


# --- nodes: the directory decides which are gone --------------------------------------------------


async def test_a_call_on_a_node_this_instance_does_not_list_is_left_to_the_directory(
    test_settings: Settings, client: AsyncTestClient[Any], visit: Visit, session_maker: Maker,
) -> None:
    """A rolling deploy: the call's room is on a live node another instance lists (SFU_URLS) and this one does
    not. This instance's directory cannot call it gone, so the keeper leaves the call alone."""
    started = await start(client, visit)
    assert (await act(client, visit.patient, started["id"], "accept")).status_code == 200
    async with node_server(test_settings) as (_, other):
        async with session_maker() as session:
            await session.execute(update(Call).where(Call.id == UUID(started["id"])).values(node=other.name))
            await session.commit()
        keeper = client.app.state.call_keeper
        for _ in range(2):
            assert UUID(started["id"]) not in {c.id for c in await on_app_loop(client, keeper.fail_gone())}
        assert (await call_of(session_maker, started["id"])).state == "active"
    assert (await act(client, visit.doctor, started["id"], "end")).status_code == 200


# --- the keeper's batches ----------------------------------------------------------------------------


@asynccontextmanager
async def counted(session_maker: Maker) -> AsyncIterator[list[str]]:
    """The SQL statements this session maker's engine runs meanwhile."""
    engine = session_maker.kw["bind"].sync_engine
    seen: list[str] = []

    def count(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        seen.append(statement)

    event.listen(engine, "before_cursor_execute", count)
    try:
        yield seen
    finally:
        event.remove(engine, "before_cursor_execute", count)


async def test_the_keeper_ends_many_calls_in_as_many_statements_as_one(
    client: AsyncTestClient[Any], patient: Session, specialist: Callable[..., Any], service: Callable[..., Any],
    visit_until: Callable[..., Any], session_maker: Maker,
) -> None:
    doctor = await specialist()
    visits = [await online_visit(patient, doctor, service, visit_until, nth=n) for n in (2, 3, 4, 5)]
    calls = [UUID((await start(client, v))["id"]) for v in visits]
    long_ago = dt.datetime(2000, 1, 1, tzinfo=dt.UTC)

    async def expire(ids: list[UUID]) -> tuple[int, int]:
        """Missed, in a transaction of its own that is rolled back: (calls ended, statements the expiry ran)."""
        async with session_maker() as session:
            # a deadline in the past only this transaction sees: no running keeper takes these calls
            await session.execute(update(Call).where(Call.id.in_(ids)).values(ring_deadline=long_ago))
            service_ = calls_for(session, client.app.state)
            async with counted(session_maker) as statements:
                missed = await service_.expire_missed(long_ago + dt.timedelta(hours=1))
            assert {c.id for c in missed} == set(ids)
            for call_id in ids:
                ended = (await session.scalars(select(UserEvent.data).where(
                    UserEvent.recipient_id == patient.id, UserEvent.type == "call.ended"))).all()
                assert any(e["call_id"] == str(call_id) for e in ended)
            await session.rollback()
        return len(missed), len(statements)

    one, many = await expire(calls[:1]), await expire(calls[1:])
    assert (one[0], many[0]) == (1, 3)
    assert one[1] == many[1], "statements grow with the number of calls"

    async def fail(ids: list[UUID]) -> int:
        node = f"http://10.255.0.12:8100#{ids[0].hex[:8]}"
        async with session_maker() as session:
            await session.execute(update(Call).where(Call.id.in_(ids)).values(node=node))
            service_ = calls_for(session, client.app.state)
            async with counted(session_maker) as statements:
                assert {c.id for c in await service_.fail_on({node})} == set(ids)
            await session.rollback()
        return len(statements)

    assert await fail(calls[:1]) == await fail(calls[1:])
    for v, call_id in zip(visits, calls, strict=True):
        assert (await act(client, v.doctor, str(call_id), "end")).status_code == 200
