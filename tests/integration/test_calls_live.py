"""GET /api/v1/calls?status=live: the caller's ringing and active calls, and nobody else's."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any
from uuid import UUID

from litestar.testing import AsyncTestClient
from sqlalchemy import update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.chat.models import Conversation
from tests.conftest import Session, refused
from tests.integration.test_calls import act, online_visit, start

Maker = async_sessionmaker[AsyncSession]


async def live(client: AsyncTestClient[Any], who: Session, **params: Any) -> dict[str, Any]:
    answer = await client.get("/api/v1/calls", headers=who.headers, params={"status": "live", **params})
    assert answer.status_code == 200, answer.text
    body: dict[str, Any] = answer.json()
    return body


def ids(page: dict[str, Any]) -> list[str]:
    return [item["id"] for item in page["items"]]


async def test_each_side_lists_its_live_calls_and_nobody_else_sees_them(
    client: AsyncTestClient[Any], patient: Session, specialist: Callable[..., Any], service: Callable[..., Any],
    visit_until: Callable[..., Any], login: Callable[[str], Any], new_phone: Callable[[], str],
    staff: Callable[..., Any], admin: Session, session_maker: Maker,
) -> None:
    doctor = await specialist()
    ringing_visit = await online_visit(patient, doctor, service, visit_until)
    active_visit = await online_visit(patient, doctor, service, visit_until, nth=4)
    guardian = await login(new_phone())  # beside the patient in the first conversation (a grown dependent's)
    async with session_maker() as session:
        await session.execute(update(Conversation).where(Conversation.id == UUID(ringing_visit.conversation_id))
                              .values(guardian_id=guardian.id))
        await session.commit()
    ringing = await start(client, ringing_visit)
    active = await start(client, active_visit)
    assert (await act(client, patient, active["id"], "accept")).status_code == 200

    for who in (patient, doctor):
        page = await live(client, who)
        assert ids(page) == [active["id"], ringing["id"]]  # newest first
        assert page["next_cursor"] is None
        states = {item["id"]: item["state"] for item in page["items"]}
        assert states == {ringing["id"]: "ringing", active["id"]: "active"}
    assert ringing_visit.conversation_id == active_visit.conversation_id  # one per patient and doctor
    assert ids(await live(client, guardian)) == [active["id"], ringing["id"]]

    # an attacker's view: another patient, another specialist, the front desk, an admin see none of them
    for stranger in (await login(new_phone()), await specialist(), await staff("registrar"), admin):
        assert await live(client, stranger) == {"items": [], "next_cursor": None}

    first = await live(client, patient, limit=1)  # pages
    assert ids(first) == [active["id"]]
    assert first["next_cursor"] is not None
    second = await live(client, patient, limit=1, cursor=first["next_cursor"])
    assert (ids(second), second["next_cursor"]) == ([ringing["id"]], None)

    for call in (ringing, active):  # ended: no longer live
        assert (await act(client, doctor, call["id"], "end")).status_code == 200
    for who in (patient, doctor, guardian):
        assert ids(await live(client, who)) == []


async def test_the_list_refuses_what_it_does_not_know(client: AsyncTestClient[Any], patient: Session) -> None:
    for params, reason in (({"status": "ended"}, "invalid_input"), ({"cursor": "not-a-cursor"}, "cursor_invalid"),
                           ({"limit": "0"}, "invalid_input")):
        refused(await client.get("/api/v1/calls", headers=patient.headers, params=params), 422, reason)
    refused(await client.get("/api/v1/calls?status=live"), 401)
