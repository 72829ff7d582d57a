"""The chat lists and a conversation's history as each caller reads them: order, counts, names, who sees what."""

from __future__ import annotations

import asyncio
import datetime as dt
import random
import uuid
from collections.abc import Callable
from typing import Any

from litestar.testing import AsyncTestClient
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from uuid_utils.compat import uuid7

from app.accounts.models import User
from app.chat.models import ChatWindow, Conversation, Message, ReadMark
from app.consultations.models import Consultation
from app.scheduling.models import Slot
from tests.conftest import Session


async def on_app_loop(client: AsyncTestClient[Any], coro: Any) -> Any:
    """Run `coro` on the app's own event loop, where its Redis client lives."""
    loop = client.app.state.outbox_worker._loop
    return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, loop))


async def send(client: AsyncTestClient[Any], who: Session, conversation_id: str, text: str) -> dict[str, Any]:
    answer = await client.post(f"/api/v1/chats/{conversation_id}/messages", headers=who.headers,
                               json={"client_id": uuid.uuid4().hex, "text": text})
    assert answer.status_code == 201, answer.text
    body: dict[str, Any] = answer.json()
    return body


async def chats(client: AsyncTestClient[Any], who: Session) -> dict[str, Any]:
    answer = await client.get("/api/v1/chats", headers=who.headers)
    assert answer.status_code == 200, answer.text
    body: dict[str, Any] = answer.json()
    return body


async def test_a_specialist_with_200_consultations_reads_them_all_earliest_first(
    client: AsyncTestClient[Any], staff: Callable[..., Any], service: Callable[..., Any],
    session_maker: async_sessionmaker[AsyncSession], new_phone: Callable[[], str],
) -> None:
    doctor, other = await staff("doctor", ["endocrinology"]), await staff("doctor", ["endocrinology"])
    visit_type = await service()
    start = dt.datetime.now(dt.UTC).replace(microsecond=0) + dt.timedelta(days=1)
    hours = list(range(203))
    random.shuffle(hours)  # rows made in another order than their times
    expected: dict[int, dict[str, Any]] = {}  # by hour: what the row must show
    async with session_maker() as session:
        async def visit(specialist_id: uuid.UUID, patient_id: uuid.UUID, hour: int, conversation_id: uuid.UUID,
                        status: str) -> Consultation:
            slot = Slot(id=uuid7(), specialist_id=specialist_id, starts_at=start + dt.timedelta(hours=hour),
                        ends_at=start + dt.timedelta(hours=hour, minutes=30))
            session.add(slot)
            await session.flush()
            return Consultation(id=uuid7(), patient_id=patient_id, specialist_id=specialist_id,
                                service_id=uuid.UUID(visit_type["id"]), slot_id=slot.id, specialty="endocrinology",
                                starts_at=slot.starts_at, ends_at=slot.ends_at, format="online", status=status,
                                paid=False, booked_by=patient_id, conversation_id=conversation_id)

        for i, hour in enumerate(hours):
            patient = User(id=uuid7(), phone=new_phone(), full_name=f"Patient{hour} Testov", roles=["patient"])
            specialist_id = other.id if i == 2 else doctor.id  # the other doctor's: not in this one's list
            conversation = Conversation(id=uuid7(), patient_id=patient.id, specialist_id=specialist_id,
                                        guardian_id=None, patient_has_login=True)
            session.add_all([patient, conversation])
            await session.flush()
            # ended visits leave the list; the live ones are of three statuses
            status = {0: "completed", 1: "cancelled"}.get(i, ["pending_confirmation", "confirmed",
                                                             "in_progress"][i % 3])
            session.add(await visit(specialist_id, patient.id, hour, conversation.id, status))
            if i > 2:
                session.add(ChatWindow(id=uuid7(), conversation_id=conversation.id, consultation_id=uuid7(),
                                       ends_at=start + dt.timedelta(hours=hour, minutes=30)))
            row: dict[str, Any] = {"conversation_id": str(conversation.id), "unread": 0, "last": None,
                                   "name": f"Patient{hour} Testov", "live": i > 2}
            if i % 7 == 3:  # two from the patient, one from the clinic, then the doctor's reply
                texts = [(patient.id, "first"), (patient.id, "second"), (None, "reminder"), (doctor.id, "reply")]
                ids = sorted(uuid7() for _ in texts)  # in the order written
                messages = [Message(id=ids[k], conversation_id=conversation.id, author_id=author,
                                    kind="system" if author is None else "text", text=text, document_ids=[],
                                    client_id=uuid.uuid4().hex) for k, (author, text) in enumerate(texts)]
                session.add_all(messages)
                row.update(unread=3, last="reply")
                if i % 14 == 3:  # the doctor read up to the first
                    await session.flush()
                    session.add(ReadMark(conversation_id=conversation.id, user_id=doctor.id,
                                         last_read_id=messages[0].id))
                    row["unread"] = 2
            expected[hour] = row
        await session.commit()

    page = await chats(client, doctor)
    assert page["next_cursor"] is None
    live = [h for h in sorted(expected) if expected[h]["live"]]
    assert len(live) == 200
    assert [r["conversation_id"] for r in page["items"]] == [expected[h]["conversation_id"] for h in live]
    starts = [dt.datetime.fromisoformat(r["writable_until"]) for r in page["items"]]
    assert starts == sorted(starts)
    for r, hour in zip(page["items"], live, strict=True):
        want = expected[hour]
        assert (r["unread"], (r["last_message"] or {}).get("text"), r["counterpart_name"]) == \
            (want["unread"], want["last"], want["name"]), hour
        assert (r["specialist_id"], r["specialty"], r["is_dependent"], r["online"], r["writable"]) == \
            (str(doctor.id), "endocrinology", False, False, True)
    assert all(r["consultation_id"] for r in page["items"])
    assert [r["conversation_id"] for r in (await chats(client, other))["items"]] == \
        [expected[hours[2]]["conversation_id"]]


async def test_the_patients_list_is_latest_first_and_holds_only_their_own(
    client: AsyncTestClient[Any], specialist: Callable[..., Any], service: Callable[..., Any], patient: Session,
    login: Callable[[str], Any], new_phone: Callable[[], str], visit_until: Callable[..., Any],
    staff: Callable[..., Any],
) -> None:
    doctors = [await specialist() for _ in range(3)]
    visit_type = await service()
    quiet, talked, latest = [(await visit_until(patient, d, visit_type, nth=n))["conversation_id"]
                             for n, d in enumerate(doctors, start=1)]
    stranger = await login(new_phone())
    theirs = (await visit_until(stranger, doctors[0], visit_type, nth=4))["conversation_id"]
    await send(client, doctors[1], talked, "older news")
    await send(client, stranger, theirs, "not for the other patient")
    await send(client, doctors[2], latest, "newest news")
    rows = (await chats(client, patient))["items"]
    assert [r["conversation_id"] for r in rows] == [latest, talked, quiet]
    assert [r["last_message"] and r["last_message"]["text"] for r in rows] == ["newest news", "older news", None]
    assert [r["unread"] for r in rows] == [1, 1, 0]
    assert all(r["consultation_id"] is None and r["online"] is None for r in rows)
    assert [r["conversation_id"] for r in (await chats(client, stranger))["items"]] == [theirs]
    assert [r["conversation_id"] for r in (await chats(client, doctors[1]))["items"]] == [talked]
    methodist = await staff("methodist")
    assert (await chats(client, methodist))["items"] == []
    for outsider in (stranger, doctors[1], methodist):
        answer = await client.get(f"/api/v1/chats/{quiet}/messages", headers=outsider.headers)
        assert answer.status_code == 404, answer.text
        assert answer.json()["detail"] == "conversation not found"


async def test_a_psychologist_lists_patients_by_initials(
    client: AsyncTestClient[Any], specialist: Callable[..., Any], service: Callable[..., Any], patient: Session,
    visit_until: Callable[..., Any],
) -> None:
    assert (await client.patch("/api/v1/me", headers=patient.headers,
                               json={"full_name": "Anna Maria Petrova"})).status_code == 200
    psychologist = await specialist("psychologist", ["psychology"])
    visit = await visit_until(patient, psychologist, await service("psychology"), nth=1)
    rows = (await chats(client, psychologist))["items"]
    assert [(r["conversation_id"], r["counterpart_name"]) for r in rows] == [(visit["conversation_id"], "A.M.P.")]
    doctor = await specialist()
    visit = await visit_until(patient, doctor, await service(), nth=2)
    assert [r["counterpart_name"] for r in (await chats(client, doctor))["items"]] == ["Anna Maria Petrova"]


async def test_history_of_an_empty_conversation_and_a_full_last_page(
    client: AsyncTestClient[Any], specialist: Callable[..., Any], service: Callable[..., Any], patient: Session,
    visit_until: Callable[..., Any],
) -> None:
    doctor, visit_type = await specialist(), await service()
    conversation_id = (await visit_until(patient, doctor, visit_type, nth=1))["conversation_id"]
    url = f"/api/v1/chats/{conversation_id}/messages"
    assert (await client.get(url, headers=doctor.headers)).json() == {"items": [], "next_cursor": None}
    sent = [await send(client, patient, conversation_id, f"m{i}") for i in range(2)]
    full = (await client.get(url, headers=doctor.headers, params={"limit": 2})).json()
    assert ([m["id"] for m in full["items"]], full["next_cursor"]) == ([s["id"] for s in sent], sent[0]["id"])
    assert (await client.get(url, headers=doctor.headers, params={"before": sent[0]["id"]})).json() == \
        {"items": [], "next_cursor": None}
    newer = (await client.get(url, headers=patient.headers, params={"after": sent[0]["id"], "limit": 1})).json()
    assert ([m["text"] for m in newer["items"]], newer["next_cursor"]) == (["m1"], sent[1]["id"])
    assert newer["items"][0] == sent[1]  # the history shows a message as its send answered it
    missing = await client.get(f"/api/v1/chats/{uuid7()}/messages", headers=doctor.headers)
    assert missing.status_code == 404


async def test_the_specialist_sees_which_patients_have_the_app_open(
    client: AsyncTestClient[Any], specialist: Callable[..., Any], service: Callable[..., Any], patient: Session,
    login: Callable[[str], Any], new_phone: Callable[[], str], visit_until: Callable[..., Any],
) -> None:
    doctor, visit_type = await specialist(), await service()
    away = await login(new_phone())
    present = {(await visit_until(patient, doctor, visit_type, nth=n))["id"] for n in (1, 2)}
    absent = (await visit_until(away, doctor, visit_type, nth=3))["id"]
    presence = client.app.state.presence
    await on_app_loop(client, presence.touch(patient.id, "socket-1", False))  # a socket, in the background
    try:
        rows = (await chats(client, doctor))["items"]
    finally:
        await on_app_loop(client, presence.leave(patient.id, "socket-1"))
    assert {r["consultation_id"]: r["online"] for r in rows} == {**dict.fromkeys(present, True), absent: False}
