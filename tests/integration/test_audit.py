"""The audit log: every staff read of a card, a conclusion, a chat history or a document is a row (who, what,
whose, from where); the patient's and the guardian's own reads are not; admins list it; rows outlive a clean
shutdown and a database that refuses them for a while; the table takes no change or delete."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any
from uuid import UUID

import msgspec
import pytest
from litestar.testing import AsyncTestClient
from prometheus_client import REGISTRY
from sqlalchemy import select, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from uuid_utils.compat import uuid7

from app.access import Role, Viewer
from app.audit.models import audit_event
from app.audit.service import AuditContext, AuditLog, row_values
from app.documents.models import Document
from app.documents.storage import new_key
from app.settings import Settings
from tests.conftest import Session, refused, running

Maker = async_sessionmaker[AsyncSession]
DIAGNOSES = [{"code": "E11.9", "title": "Type 2 diabetes mellitus without complications", "main": True}]
CHILD = {"full_name": "Sasha Testov", "birth_date": "2017-09-09", "relation": "child",
         "legal_basis": "birth certificate IV-AB 111222"}
TEST_CLIENT_ADDRESS = "testclient"  # the peer Litestar's test client reports


def audit_of(client: AsyncTestClient[Any]) -> AuditLog:
    audit: AuditLog = client.app.state.audit
    return audit


async def flush(client: AsyncTestClient[Any]) -> bool:
    """Write what this instance recorded now, on the app's own loop (the queue's task would write it within its
    interval; a test does not wait for a clock)."""
    written: bool = await asyncio.to_thread(client.blocking_portal.call, audit_of(client).flush)
    return written


async def flushed(client: AsyncTestClient[Any]) -> None:
    assert await flush(client)


async def events(client: AsyncTestClient[Any], admin: Session, **params: Any) -> list[dict[str, Any]]:
    await flushed(client)
    answer = await client.get("/api/v1/audit", headers=admin.headers, params={"limit": 200, **params})
    assert answer.status_code == 200, answer.text
    items: list[dict[str, Any]] = answer.json()["items"]
    return items


async def read(client: AsyncTestClient[Any], who: Session, url: str, request_id: str) -> Any:
    answer = await client.get(url, headers={**who.headers, "X-Request-ID": request_id})
    assert answer.status_code == 200, answer.text
    return answer.json()


async def in_progress_visit(client: AsyncTestClient[Any], patient: Session, doctor: Session, svc: dict[str, Any],
                            visit_until: Callable[..., Any], **extra: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """A visit under way with its conclusion written: what the doctor then reads."""
    visit = await visit_until(patient, doctor, svc, until="in_progress", nth=1, **extra)
    answer = await client.post(f"/api/v1/consultations/{visit['id']}/conclusion", headers=doctor.headers,
                               json={"diagnoses": DIAGNOSES})
    assert answer.status_code == 201, answer.text
    conclusion: dict[str, Any] = answer.json()
    return visit, conclusion


def row_of(found: list[dict[str, Any]], request_id: str) -> dict[str, Any]:
    rows = [r for r in found if r["request_id"] == request_id]
    assert len(rows) == 1, found
    return rows[0]


async def test_staff_reads_of_a_card_a_conclusion_and_a_chat_are_recorded(
    client: AsyncTestClient[Any], patient: Session, admin: Session, staff: Callable[..., Any],
    specialist: Callable[..., Any], service: Callable[..., Any], visit_until: Callable[..., Any],
) -> None:
    doctor, stranger = await specialist(), await specialist()
    registrar = await staff("registrar")
    visit, conclusion = await in_progress_visit(client, patient, doctor, await service(), visit_until)
    card_url = f"/api/v1/patients/{patient.id}"
    conclusion_url = f"/api/v1/consultations/{visit['id']}/conclusion"
    chat_url = f"/api/v1/chats/{visit['conversation_id']}/messages"

    await read(client, doctor, card_url, "audit-card-doctor")
    await read(client, registrar, card_url, "audit-card-registrar")
    await read(client, doctor, conclusion_url, "audit-conclusion")
    await read(client, doctor, chat_url, "audit-chat")
    for url in (card_url, conclusion_url, chat_url):  # a refused read revealed nothing: no row
        refused(await client.get(url, headers={**stranger.headers, "X-Request-ID": "audit-refused"}), 404)

    found = await events(client, admin, patient_id=str(patient.id))
    assert {r["request_id"] for r in found} == {"audit-card-doctor", "audit-card-registrar", "audit-conclusion",
                                                "audit-chat"}
    expected = {
        "audit-card-doctor": (doctor, "doctor", "card.read", "patient", str(patient.id)),
        "audit-card-registrar": (registrar, "registrar", "card.read", "patient", str(patient.id)),
        "audit-conclusion": (doctor, "doctor", "conclusion.read", "conclusion", conclusion["id"]),
        "audit-chat": (doctor, "doctor", "chat.read", "conversation", visit["conversation_id"]),
    }
    for request_id, (who, role, action, target_type, target_id) in expected.items():
        row = row_of(found, request_id)
        assert set(row) == {"id", "at", "actor_id", "actor_role", "action", "target_type", "target_id",
                            "patient_id", "request_id", "ip"}
        assert (row["actor_id"], row["actor_role"], row["action"], row["target_type"], row["target_id"],
                row["patient_id"], row["ip"]) == (str(who.id), role, action, target_type, target_id,
                                                  str(patient.id), TEST_CLIENT_ADDRESS), row


async def test_the_patients_and_the_guardians_own_reads_record_nothing(
    client: AsyncTestClient[Any], patient: Session, admin: Session, specialist: Callable[..., Any],
    service: Callable[..., Any], visit_until: Callable[..., Any],
) -> None:
    doctor = await specialist()
    pediatrician = await specialist("doctor", ["pediatrics"])
    own_visit, _ = await in_progress_visit(client, patient, doctor, await service(), visit_until)
    answer = await client.post("/api/v1/me/dependents", headers=patient.headers, json=CHILD)
    assert answer.status_code == 201, answer.text
    child = answer.json()
    child_visit = await visit_until(patient, pediatrician, await service("pediatrics"), until="in_progress", nth=3,
                                    patient_id=child["id"])
    answer = await client.post(f"/api/v1/consultations/{child_visit['id']}/conclusion",
                               headers=pediatrician.headers, json={"diagnoses": DIAGNOSES})
    assert answer.status_code == 201, answer.text

    for visit, whose in ((own_visit, patient.id), (child_visit, child["id"])):
        await read(client, patient, f"/api/v1/patients/{whose}", "own-card")
        await read(client, patient, f"/api/v1/consultations/{visit['id']}/conclusion", "own-conclusion")
        await read(client, patient, f"/api/v1/chats/{visit['conversation_id']}/messages", "own-chat")
    assert await events(client, admin, patient_id=str(patient.id)) == []
    assert await events(client, admin, patient_id=child["id"]) == []
    assert await events(client, admin, actor_id=str(patient.id)) == []
    # the same reads by the dependent's doctor are recorded, against the dependent
    await read(client, pediatrician, f"/api/v1/chats/{child_visit['conversation_id']}/messages", "child-chat")
    [row] = await events(client, admin, patient_id=child["id"])
    assert (row["actor_id"], row["action"], row["request_id"]) == (str(pediatrician.id), "chat.read", "child-chat")


async def test_admins_list_the_log_by_patient_actor_and_action_newest_first_in_pages(
    client: AsyncTestClient[Any], patient: Session, admin: Session, staff: Callable[..., Any],
    specialist: Callable[..., Any], service: Callable[..., Any], visit_until: Callable[..., Any],
) -> None:
    doctor = await specialist()
    registrar = await staff("registrar")
    visit, _ = await in_progress_visit(client, patient, doctor, await service(), visit_until)
    card_url = f"/api/v1/patients/{patient.id}"
    chat_url = f"/api/v1/chats/{visit['conversation_id']}/messages"
    order = []
    for i in range(3):
        await read(client, doctor, card_url, f"list-card-{i}")
        await read(client, doctor, chat_url, f"list-chat-{i}")
        await read(client, registrar, card_url, f"list-registrar-{i}")
        order += [f"list-card-{i}", f"list-chat-{i}", f"list-registrar-{i}"]

    mine = await events(client, admin, patient_id=str(patient.id))
    assert [r["request_id"] for r in mine] == order[::-1]  # newest first
    by_doctor = await events(client, admin, actor_id=str(doctor.id))
    assert [r["request_id"] for r in by_doctor] == [o for o in order[::-1] if not o.startswith("list-registrar")]
    chats = await events(client, admin, patient_id=str(patient.id), action="chat.read")
    assert [r["request_id"] for r in chats] == [f"list-chat-{i}" for i in (2, 1, 0)]
    registrar_cards = await events(client, admin, actor_id=str(registrar.id), action="card.read")
    assert [r["request_id"] for r in registrar_cards] == [f"list-registrar-{i}" for i in (2, 1, 0)]
    assert {r["action"] for r in await events(client, admin, action="card.read")} == {"card.read"}

    paged: list[str] = []
    cursor = None
    while True:
        params: dict[str, str | int] = {"patient_id": str(patient.id), "limit": 4,
                                        **({"cursor": cursor} if cursor else {})}
        answer = await client.get("/api/v1/audit", headers=admin.headers, params=params)
        assert answer.status_code == 200, answer.text
        page = answer.json()
        assert len(page["items"]) <= 4
        paged += [r["request_id"] for r in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert paged == order[::-1]

    for who in (doctor, registrar, patient):
        refused(await client.get("/api/v1/audit", headers=who.headers), 403)
    refused(await client.get("/api/v1/audit"), 401)
    refused(await client.get("/api/v1/audit", headers=admin.headers, params={"action": "card.write"}), 422)
    refused(await client.get("/api/v1/audit", headers=admin.headers, params={"cursor": "yesterday"}), 422,
            "cursor_invalid")


async def test_rows_recorded_before_a_clean_shutdown_are_written(
    test_settings: Settings, patient: Session, staff: Callable[..., Any], session_maker: Maker,
) -> None:
    registrar = await staff("registrar")
    # an instance whose queue would wait an hour: only its shutdown writes the row
    lazy = msgspec.structs.replace(test_settings, audit_flush_seconds=3600.0)
    async with running(lazy) as other:
        await read(other, registrar, f"/api/v1/patients/{patient.id}", "before-shutdown")
        assert audit_of(other).pending == 1
    async with session_maker() as session:
        rows = (await session.execute(select(audit_event).where(audit_event.c.request_id == "before-shutdown"))).all()
    assert [(r.actor_id, r.action, r.patient_id) for r in rows] == [(registrar.id, "card.read", patient.id)]


def failures() -> float:
    return REGISTRY.get_sample_value("clinic_audit_write_failures_total") or 0.0


async def test_a_database_refusing_the_audit_write_never_fails_the_read_and_loses_no_row(
    client: AsyncTestClient[Any], patient: Session, admin: Session, staff: Callable[..., Any], session_maker: Maker,
    caplog: pytest.LogCaptureFixture,
) -> None:
    registrar = await staff("registrar")
    before = failures()
    async with session_maker() as session:  # the table is gone: every INSERT into it fails
        await session.execute(text("ALTER TABLE audit_event RENAME TO audit_event_away"))
        await session.commit()
    try:
        with caplog.at_level(logging.ERROR, logger="app.audit"):
            card = await read(client, registrar, f"/api/v1/patients/{patient.id}", "while-refused")
            assert card["id"] == str(patient.id)
            assert not await flush(client)
        assert failures() > before  # the metric an operator alerts on
        assert any(r.name == "app.audit" and "not written" in r.getMessage() for r in caplog.records)
        assert audit_of(client).pending >= 1  # kept for the next try
    finally:
        async with session_maker() as session:
            await session.execute(text("ALTER TABLE audit_event_away RENAME TO audit_event"))
            await session.commit()
    [row] = [r for r in await events(client, admin, patient_id=str(patient.id)) if r["request_id"] == "while-refused"]
    assert (row["actor_id"], row["action"]) == (str(registrar.id), "card.read")


async def test_the_table_takes_no_change_and_no_delete(
    client: AsyncTestClient[Any], patient: Session, admin: Session, staff: Callable[..., Any], session_maker: Maker,
) -> None:
    registrar = await staff("registrar")
    await read(client, registrar, f"/api/v1/patients/{patient.id}", "append-only")
    [row] = await events(client, admin, actor_id=str(registrar.id))
    for statement in (audit_event.update().where(audit_event.c.id == UUID(row["id"])).values(action="card.hidden"),
                      audit_event.delete().where(audit_event.c.id == UUID(row["id"]))):
        async with session_maker() as session:
            with pytest.raises(DBAPIError, match="append-only"):
                await session.execute(statement)
            await session.rollback()
    assert await events(client, admin, actor_id=str(registrar.id)) == [row]


async def a_ready_document(session_maker: Maker, patient: Session) -> UUID:
    """An analysis the patient uploaded, ready (written straight into the table: its bytes do not matter here)."""
    document = Document(id=uuid7(), patient_id=patient.id, kind="analysis", filename="glucose.pdf",
                        content_type="application/pdf", size=1234, status="ready", author_id=patient.id,
                        author_role="patient", storage_key=new_key())
    async with session_maker() as session:
        session.add(document)
        await session.commit()
    return document.id


async def test_staff_reads_of_documents_are_recorded_and_the_patients_own_are_not(
    client: AsyncTestClient[Any], patient: Session, admin: Session, specialist: Callable[..., Any],
    service: Callable[..., Any], visit_until: Callable[..., Any], session_maker: Maker,
) -> None:
    doctor = await specialist()
    await visit_until(patient, doctor, await service(), until="in_progress", nth=1)  # in care
    document_id = await a_ready_document(session_maker, patient)
    urls = {"document.read": f"/api/v1/documents/{document_id}",
            "documents.list": f"/api/v1/documents?patient_id={patient.id}",
            "document.download": f"/api/v1/documents/{document_id}/download"}
    for who in (patient, doctor):
        for action, url in urls.items():
            answer = await client.get(url, headers={**who.headers, "X-Request-ID": f"doc-{action}"},
                                      follow_redirects=False)
            assert answer.status_code == (307 if action == "document.download" else 200), answer.text

    found = await events(client, admin, patient_id=str(patient.id))
    assert {r["actor_id"] for r in found} == {str(doctor.id)}  # none of the patient's own reads
    targets = {"document.read": ("document", str(document_id)), "documents.list": ("patient", str(patient.id)),
               "document.download": ("document", str(document_id))}
    for action, (target_type, target_id) in targets.items():
        row = row_of(found, f"doc-{action}")
        assert (row["actor_role"], row["action"], row["target_type"], row["target_id"], row["patient_id"],
                row["ip"]) == ("doctor", action, target_type, target_id, str(patient.id), TEST_CLIENT_ADDRESS), row


async def test_a_batch_written_once_whose_answer_was_lost_does_not_block_the_queue(
    client: AsyncTestClient[Any], patient: Session, staff: Callable[..., Any], session_maker: Maker,
) -> None:
    registrar = await staff("registrar")
    audit = audit_of(client)
    await flushed(client)  # nothing else of this test's in the queue
    ctx = AuditContext(actor=Viewer(registrar.id, frozenset({Role.REGISTRAR})), request_id="lost-answer", ip=None)

    database = audit.database
    assert database is not None

    async def record_three_the_first_already_written() -> None:
        # on the app's loop, holding the writer's lock: its own task cannot write the rows first
        async with audit._lock:
            for _ in range(3):
                audit.record(ctx, "card.read", "patient", patient.id, patient.id)
            first = row_values(audit._pending[-3])
            async with database.engine.begin() as conn:
                # the first row reached the table, but the writer never heard back
                await conn.execute(audit_event.insert(), [first])

    await asyncio.to_thread(client.blocking_portal.call, record_three_the_first_already_written)
    assert await flush(client)  # written again, passing over the row already there
    assert audit.pending == 0
    async with session_maker() as session:
        ids = (await session.scalars(select(audit_event.c.id).where(audit_event.c.request_id == "lost-answer"))).all()
    assert len(ids) == len(set(ids)) == 3
