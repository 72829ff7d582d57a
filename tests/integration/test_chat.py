"""Chat over REST: windows opened and closed by consultations, idempotent sends, views, read marks, access."""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Callable
from typing import Any

import msgspec
from litestar.testing import AsyncTestClient
from sqlalchemy import func, select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.chat.models import Message, UserEvent
from app.outbox import OutboxEvent
from app.settings import Settings
from tests.conftest import Session, running


async def send(client: AsyncTestClient[Any], who: Session, conversation_id: str, text: str,
               client_id: str | None = None) -> Any:
    return await client.post(f"/api/v1/chats/{conversation_id}/messages", headers=who.headers,
                             json={"client_id": client_id or uuid.uuid4().hex,
                                   "text": text})


async def test_a_confirmed_consultation_opens_the_chat_and_its_end_closes_it(
    client: AsyncTestClient[Any], specialist: Callable[..., Any], service: Callable[..., Any], patient: Session,
    book: Callable[..., Any], staff: Callable[..., Any],
) -> None:
    doctor, visit_type = await specialist(), await service()
    pending = (await book(patient, doctor, visit_type)).json()
    assert (await send(client, patient, pending["conversation_id"], "hello?")).status_code == 409  # not yet
    registrar = await staff("registrar")
    await client.post(f"/api/v1/consultations/{pending['id']}/confirm", headers=registrar.headers)
    sent = await send(client, patient, pending["conversation_id"], "my results are attached")
    assert sent.status_code == 201, sent.text
    reply = await send(client, doctor, pending["conversation_id"], "thank you, I will look")
    assert reply.status_code == 201
    for step in ("start", "complete"):
        await client.post(f"/api/v1/consultations/{pending['id']}/{step}", headers=doctor.headers)
    closed = await send(client, patient, pending["conversation_id"], "one more question")
    assert closed.status_code == 409
    assert closed.json()["extra"]["reason"] == "conversation_closed"
    history = (await client.get(f"/api/v1/chats/{pending['conversation_id']}/messages",
                                headers=patient.headers)).json()["items"]
    assert [m["text"] for m in history] == ["my results are attached", "thank you, I will look"]  # never lost


async def test_the_specialist_extends_a_closed_chat(
    client: AsyncTestClient[Any], specialist: Callable[..., Any], service: Callable[..., Any], patient: Session,
    visit_until: Callable[..., Any],
) -> None:
    doctor, visit_type = await specialist(), await service()
    visit = await visit_until(patient, doctor, visit_type, "completed")
    until = (dt.datetime.now(dt.UTC) + dt.timedelta(days=3)).isoformat()
    assert (await client.post(f"/api/v1/consultations/{visit['id']}/chat/extend", headers=patient.headers,
                              json={"until": until})).status_code == 403
    extended = await client.post(f"/api/v1/consultations/{visit['id']}/chat/extend", headers=doctor.headers,
                                 json={"until": until})
    assert extended.status_code == 200, extended.text
    assert extended.json()["writable"] is True
    assert (await send(client, patient, visit["conversation_id"], "the rash is back")).status_code == 201
    history = (await client.get(f"/api/v1/chats/{visit['conversation_id']}/messages",
                                headers=patient.headers)).json()["items"]
    assert history[-2]["kind"] == "system"
    assert history[-2]["text"].startswith("Chat extended until")
    assert history[-2]["author_id"] is None
    for bad in ((dt.datetime.now(dt.UTC) - dt.timedelta(hours=1)).isoformat(),
                (dt.datetime.now(dt.UTC) + dt.timedelta(days=400)).isoformat(), "2026-13-01", "2030-01-01T10:00:00"):
        answer = await client.post(f"/api/v1/consultations/{visit['id']}/chat/extend", headers=doctor.headers,
                                   json={"until": bad})
        assert answer.status_code == 422, bad


async def test_a_retried_send_is_one_message(
    client: AsyncTestClient[Any], specialist: Callable[..., Any], service: Callable[..., Any], patient: Session,
    session_maker: async_sessionmaker[AsyncSession], visit_until: Callable[..., Any],
) -> None:
    doctor, visit_type = await specialist(), await service()
    visit = await visit_until(patient, doctor, visit_type)
    first = await send(client, patient, visit["conversation_id"], "only once", client_id="retry-me-1")
    again = await send(client, patient, visit["conversation_id"], "only once", client_id="retry-me-1")
    assert (first.status_code, again.status_code) == (201, 200)
    assert again.json() == first.json()
    async with session_maker() as session:
        count = await session.scalar(select(func.count()).select_from(Message).where(
            Message.conversation_id == visit["conversation_id"]))
        events = await session.scalar(select(func.count()).select_from(UserEvent).where(
            UserEvent.type == "message.new", UserEvent.recipient_id == doctor.id))
    assert count == 1
    assert events == 1  # announced once too
    same_id_other_author = await send(client, doctor, visit["conversation_id"], "mine", client_id="retry-me-1")
    assert same_id_other_author.status_code == 201  # client ids are per author


async def test_bad_messages_are_refused(
    client: AsyncTestClient[Any], specialist: Callable[..., Any], service: Callable[..., Any], patient: Session,
    visit_until: Callable[..., Any],
) -> None:
    doctor, visit_type = await specialist(), await service()
    visit = await visit_until(patient, doctor, visit_type)
    url = f"/api/v1/chats/{visit['conversation_id']}/messages"
    cases = [({"client_id": "a", "text": "   "}, "message_empty"), ({"client_id": "b"}, "message_empty"),
             ({"client_id": "", "text": "x"}, "invalid_input"), ({"client_id": "x" * 65, "text": "x"}, "invalid_input"),
             ({"client_id": "with space", "text": "x"}, "invalid_input"),
             ({"client_id": "c", "text": "x" * 4001}, "invalid_input"),
             ({"client_id": "d", "text": "x", "document_ids": ["00000000-0000-0000-0000-000000000000"]},
              "document_unknown")]
    for body, reason in cases:
        answer = await client.post(url, headers=patient.headers, json=body)
        assert answer.status_code == 422, body
        assert answer.json()["extra"]["reason"] == reason, body


async def test_strangers_cannot_read_or_write(
    client: AsyncTestClient[Any], specialist: Callable[..., Any], service: Callable[..., Any], patient: Session,
    staff: Callable[..., Any], login: Callable[[str], Any], new_phone: Callable[[], str],
    visit_until: Callable[..., Any],
) -> None:
    doctor, visit_type = await specialist(), await service()
    visit = await visit_until(patient, doctor, visit_type)
    await send(client, patient, visit["conversation_id"], "private")
    stranger = await login(new_phone())
    other_doctor = await specialist()
    for who in (stranger, other_doctor, await staff("methodist"), await staff("registrar"), await staff("admin")):
        base = f"/api/v1/chats/{visit['conversation_id']}"
        assert (await client.get(f"{base}/messages", headers=who.headers)).status_code == 404
        assert (await send(client, who, visit["conversation_id"], "hi")).status_code == 404
        assert (await client.post(f"{base}/read", headers=who.headers,
                                  json={"up_to_message_id": visit["id"]})).status_code == 404


async def test_patient_sees_one_row_per_specialist_with_dependents_marked(
    client: AsyncTestClient[Any], specialist: Callable[..., Any], service: Callable[..., Any], patient: Session,
    visit_until: Callable[..., Any],
) -> None:
    doctor = await specialist("doctor", ["endocrinology", "pediatrics"])
    adult, child_visit_type = await service(), await service("pediatrics")
    child = (await client.post("/api/v1/me/dependents", headers=patient.headers, json={
        "full_name": "Tim Testov", "birth_date": "2019-01-01", "relation": "child",
        "legal_basis": "birth certificate"})).json()
    mine = await visit_until(patient, doctor, adult)
    again = await visit_until(patient, doctor, adult, nth=1)
    theirs = await visit_until(patient, doctor, child_visit_type, nth=2,
                                   patient_id=child["id"])
    assert mine["conversation_id"] == again["conversation_id"]  # one conversation per patient and specialist
    assert theirs["conversation_id"] != mine["conversation_id"]
    await send(client, doctor, mine["conversation_id"], "how are you?")
    await send(client, patient, theirs["conversation_id"], "Tim has a fever")  # the guardian writes for the child
    rows = (await client.get("/api/v1/chats", headers=patient.headers)).json()["items"]
    assert len(rows) == 2
    by_patient = {r["patient_id"]: r for r in rows}
    assert by_patient[str(patient.id)]["is_dependent"] is False
    assert by_patient[child["id"]]["is_dependent"] is True
    assert by_patient[str(patient.id)]["unread"] == 1
    assert by_patient[str(patient.id)]["last_message"]["text"] == "how are you?"
    assert by_patient[str(patient.id)]["counterpart_name"] == "Test doctor"
    assert by_patient[child["id"]]["unread"] == 0  # the guardian's own message


async def test_specialist_sees_a_row_per_consultation_with_one_shared_history(
    client: AsyncTestClient[Any], specialist: Callable[..., Any], service: Callable[..., Any], patient: Session,
    visit_until: Callable[..., Any],
) -> None:
    doctor = await specialist("doctor", ["gynecology", "endocrinology"])
    gyn, endo = await service("gynecology"), await service("endocrinology")
    assert (await client.patch("/api/v1/me", headers=patient.headers, json={"sex": "female"})).status_code == 200
    first = await visit_until(patient, doctor, gyn)
    second = await visit_until(patient, doctor, endo, nth=1)
    await send(client, patient, first["conversation_id"], "question one")
    rows = (await client.get("/api/v1/chats", headers=doctor.headers)).json()["items"]
    assert {r["consultation_id"] for r in rows} == {first["id"], second["id"]}
    assert {r["specialty"] for r in rows} == {"gynecology", "endocrinology"}
    assert {r["conversation_id"] for r in rows} == {first["conversation_id"]}
    assert all(r["unread"] == 1 and r["last_message"]["text"] == "question one" for r in rows)
    assert all(r["online"] is False for r in rows)


async def test_read_marks_move_forward_and_reach_the_other_side(
    client: AsyncTestClient[Any], specialist: Callable[..., Any], service: Callable[..., Any], patient: Session,
    session_maker: async_sessionmaker[AsyncSession], visit_until: Callable[..., Any],
) -> None:
    doctor, visit_type = await specialist(), await service()
    visit = await visit_until(patient, doctor, visit_type)
    sent = [(await send(client, doctor, visit["conversation_id"], f"note {i}")).json() for i in range(3)]
    url = f"/api/v1/chats/{visit['conversation_id']}/read"
    assert (await client.post(url, headers=patient.headers, json={"up_to_message_id": sent[1]["id"]})).status_code \
        == 204
    await client.post(url, headers=patient.headers, json={"up_to_message_id": sent[0]["id"]})  # backwards: no-op
    rows = (await client.get("/api/v1/chats", headers=patient.headers)).json()["items"]
    assert rows[0]["unread"] == 1
    async with session_maker() as session:
        reads = (await session.scalars(select(UserEvent).where(UserEvent.recipient_id == doctor.id,
                                                               UserEvent.type == "message.read"))).all()
    assert [r.data["up_to_message_id"] for r in reads] == [sent[1]["id"]]
    unknown = await client.post(url, headers=patient.headers, json={"up_to_message_id": visit["id"]})
    assert unknown.status_code == 404


async def test_history_pages_both_ways(
    client: AsyncTestClient[Any], specialist: Callable[..., Any], service: Callable[..., Any], patient: Session,
    visit_until: Callable[..., Any],
) -> None:
    doctor, visit_type = await specialist(), await service()
    visit = await visit_until(patient, doctor, visit_type)
    texts = [f"m{i}" for i in range(7)]
    for text in texts:
        await send(client, patient, visit["conversation_id"], text)
    url = f"/api/v1/chats/{visit['conversation_id']}/messages"
    latest = (await client.get(url, headers=doctor.headers, params={"limit": 3})).json()
    assert [m["text"] for m in latest["items"]] == ["m4", "m5", "m6"]
    older = (await client.get(url, headers=doctor.headers, params={"limit": 3, "before": latest["next_cursor"]})).json()
    assert [m["text"] for m in older["items"]] == ["m1", "m2", "m3"]
    newer = (await client.get(url, headers=doctor.headers,
                              params={"limit": 3, "after": older["items"][-1]["id"]})).json()
    assert [m["text"] for m in newer["items"]] == ["m4", "m5", "m6"]


async def test_an_absent_recipient_gets_a_push_through_the_outbox(
    client: AsyncTestClient[Any], specialist: Callable[..., Any], service: Callable[..., Any], patient: Session,
    session_maker: async_sessionmaker[AsyncSession], visit_until: Callable[..., Any],
) -> None:
    doctor, visit_type = await specialist(), await service()
    visit = await visit_until(patient, doctor, visit_type)
    sent = (await send(client, doctor, visit["conversation_id"], "your results are fine")).json()
    async with session_maker() as session:
        pushes = (await session.scalars(select(OutboxEvent).where(OutboxEvent.type == "push",
                                                                  OutboxEvent.aggregate_id == sent["id"]))).all()
    assert [p.recipients for p in pushes] == [[str(patient.id)]]
    assert pushes[0].payload == {"type": "message.new", "ref": sent["id"], "conversation_id": visit["conversation_id"]}
    assert "results" not in str(pushes[0].payload)  # no message text crosses a push service


async def test_sending_is_rate_limited(
    test_settings: Settings, specialist: Callable[..., Any], service: Callable[..., Any], patient: Session,
    visit_until: Callable[..., Any],
) -> None:
    doctor, visit_type = await specialist(), await service()
    visit = await visit_until(patient, doctor, visit_type)
    async with running(msgspec.structs.replace(test_settings, chat_sends_per_minute=3)) as strict:
        statuses = [(await send(strict, patient, visit["conversation_id"], f"spam {i}")).status_code
                    for i in range(5)]
        limited = await send(strict, patient, visit["conversation_id"], "more")
    assert statuses[:3] == [201, 201, 201]
    assert limited.status_code == 429
    assert int(limited.headers["retry-after"]) > 0


async def test_authors_edit_and_delete_shortly_after_sending(
    client: AsyncTestClient[Any], specialist: Callable[..., Any], service: Callable[..., Any], patient: Session,
    staff: Callable[..., Any], session_maker: async_sessionmaker[AsyncSession], visit_until: Callable[..., Any],
) -> None:
    doctor, visit_type = await specialist(), await service()
    visit = await visit_until(patient, doctor, visit_type)
    url = f"/api/v1/chats/{visit['conversation_id']}/messages"
    typo = (await send(client, patient, visit["conversation_id"], "my sugar is 99")).json()
    oops = (await send(client, patient, visit["conversation_id"], "wrong chat, sorry")).json()
    edited = await client.patch(f"{url}/{typo['id']}", headers=patient.headers, json={"text": "my sugar is 9.9"})
    assert edited.status_code == 200, edited.text
    assert (edited.json()["text"], edited.json()["deleted"]) == ("my sugar is 9.9", False)
    assert edited.json()["edited_at"] is not None
    assert (await client.patch(f"{url}/{typo['id']}", headers=doctor.headers,
                               json={"text": "no"})).json()["extra"]["reason"] == "not_author"
    gone = await client.delete(f"{url}/{oops['id']}", headers=patient.headers)
    assert gone.status_code == 200
    assert (gone.json()["text"], gone.json()["deleted"]) == ("", True)
    again = await client.patch(f"{url}/{oops['id']}", headers=patient.headers, json={"text": "back"})
    assert again.json()["extra"]["reason"] == "message_deleted"
    history = (await client.get(url, headers=doctor.headers)).json()["items"]
    assert [(m["text"], m["deleted"]) for m in history] == [("my sugar is 9.9", False), ("", True)]
    async with session_maker() as session:
        updates = (await session.scalars(select(UserEvent).where(
            UserEvent.recipient_id == doctor.id, UserEvent.type == "message.updated").order_by(UserEvent.seq))).all()
        assert [u.data["id"] for u in updates] == [typo["id"], oops["id"]]
        await session.execute(update(Message).where(Message.id == uuid.UUID(typo["id"]))
                              .values(created_at=dt.datetime.now(dt.UTC) - dt.timedelta(hours=1)))
        await session.commit()
    late = await client.patch(f"{url}/{typo['id']}", headers=patient.headers, json={"text": "later"})
    assert late.status_code == 409
    assert late.json()["extra"]["reason"] == "edit_window_over"
    stranger_view = await client.delete(f"{url}/{typo['id']}", headers=(await staff("registrar")).headers)
    assert stranger_view.status_code == 404
