"""Documents in chat messages: ready documents of the conversation's patient that the author may see, shown to
both sides in REST and in message.new; analyses the patient's side sends enter the methodists' inbox."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any
from uuid import UUID

import pytest
from litestar.testing import AsyncTestClient
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.chat.models import UserEvent
from app.documents.models import Document
from app.settings import Settings
from tests.conftest import Session, refused
from tests.integration.documents_world import Clinic


@dataclass
class Chats:
    clinic: Clinic
    patient: Session
    doctor: Session
    psychologist: Session
    other: Session
    with_doctor: str
    with_psychologist: str


@pytest.fixture(scope="module")
async def chats(client: AsyncTestClient[Any], test_settings: Settings,
                session_maker: async_sessionmaker[AsyncSession]) -> Chats:
    clinic = Clinic(client, test_settings, session_maker)
    await clinic.start()
    patient, other = await clinic.patient(), await clinic.patient()
    doctor = await clinic.specialist("doctor", "endocrinology")
    psychologist = await clinic.specialist("psychologist", "psychology")
    with_doctor = await clinic.visit(patient, doctor, await clinic.service("endocrinology"), 1)
    with_psychologist = await clinic.visit(patient, psychologist, await clinic.service("psychology"), 3)
    return Chats(clinic, patient, doctor, psychologist, other, with_doctor["conversation_id"],
                 with_psychologist["conversation_id"])


async def send(client: AsyncTestClient[Any], who: Session, conversation_id: str, document_ids: list[UUID],
               text: str | None = "attached", client_id: str | None = None) -> Any:
    body: dict[str, Any] = {"client_id": client_id or uuid.uuid4().hex, "document_ids": [str(d) for d in document_ids]}
    if text is not None:
        body["text"] = text
    return await client.post(f"/api/v1/chats/{conversation_id}/messages", headers=who.headers, json=body)


async def message_events(sessions: async_sessionmaker[AsyncSession], user: UUID, message_id: str) -> list[Any]:
    async with sessions() as session:
        rows = (await session.scalars(select(UserEvent.data).where(UserEvent.recipient_id == user,
                                                                   UserEvent.type == "message.new"))).all()
    return [r for r in rows if r["id"] == message_id]


async def test_both_sides_see_the_documents_of_a_message(
        client: AsyncTestClient[Any], chats: Chats, session_maker: async_sessionmaker[AsyncSession]) -> None:
    patient, doctor = chats.patient, chats.doctor
    scan = await chats.clinic.document(patient.id, patient, "patient", "image", filename="knee.png")
    report = await chats.clinic.document(patient.id, doctor, "doctor", "referral", filename="referral.pdf")
    answer = await send(client, patient, chats.with_doctor, [scan, report])
    assert answer.status_code == 201, answer.text
    message = answer.json()
    shown = [{"id": str(scan), "filename": "knee.png", "content_type": "application/pdf", "size": 1234,
              "kind": "image"},
             {"id": str(report), "filename": "referral.pdf", "content_type": "application/pdf", "size": 1234,
              "kind": "referral"}]
    assert message["documents"] == shown
    assert message["document_ids"] == [str(scan), str(report)]
    for who in (patient, doctor):
        history = await client.get(f"/api/v1/chats/{chats.with_doctor}/messages", headers=who.headers)
        found = [m for m in history.json()["items"] if m["id"] == message["id"]]
        assert [m["documents"] for m in found] == [shown]
        live = await message_events(session_maker, who.id, message["id"])
        assert [e["documents"] for e in live] == [shown]
    retried = await send(client, patient, chats.with_doctor, [scan, report], client_id=message["client_id"])
    assert retried.status_code == 200
    assert retried.json()["documents"] == shown  # a retry answers the first copy, documents and all


async def test_documents_alone_make_a_message(client: AsyncTestClient[Any], chats: Chats) -> None:
    scan = await chats.clinic.document(chats.patient.id, chats.patient, "patient", "image")
    answer = await send(client, chats.patient, chats.with_doctor, [scan], text=None)
    assert answer.status_code == 201, answer.text
    assert answer.json()["text"] == ""
    assert [d["id"] for d in answer.json()["documents"]] == [str(scan)]


async def test_a_document_the_author_may_not_attach_is_unknown(client: AsyncTestClient[Any], chats: Chats) -> None:
    clinic, patient = chats.clinic, chats.patient
    others = await clinic.document(chats.other.id, chats.other, "patient", "image")
    pending = await clinic.document(patient.id, patient, "patient", "image", status="pending")
    rejected = await clinic.document(patient.id, patient, "patient", "image", status="rejected")
    doctors = await clinic.document(patient.id, chats.doctor, "doctor", "conclusion")
    fine = await clinic.document(patient.id, patient, "patient", "image")
    cases = [(patient, chats.with_doctor, [others]), (patient, chats.with_doctor, [pending]),
             (patient, chats.with_doctor, [rejected]), (patient, chats.with_doctor, [fine, UUID(int=5)]),
             (chats.psychologist, chats.with_psychologist, [doctors]),  # medical secrecy holds in chat too
             (chats.doctor, chats.with_doctor, [others])]
    for who, conversation, documents in cases:
        refused(await send(client, who, conversation, documents), 422, "document_unknown")
    refused(await send(client, patient, chats.with_doctor, [fine] * 11), 422, "invalid_input")  # at most 10
    # what the patient sends reaches the specialist: a doctor's conclusion never reaches a psychologist
    refused(await send(client, patient, chats.with_psychologist, [fine, doctors]), 422, "document_not_shareable")
    assert (await send(client, patient, chats.with_psychologist, [fine])).status_code == 201
    refused(await send(client, chats.other, chats.with_doctor, [others]), 404)  # not their conversation


async def test_an_analysis_the_patient_sends_enters_the_inbox(
        client: AsyncTestClient[Any], chats: Chats, session_maker: async_sessionmaker[AsyncSession]) -> None:
    clinic, patient = chats.clinic, chats.patient
    analysis = await clinic.document(patient.id, patient, "patient", "analysis")  # not in the inbox yet
    doctors = await clinic.document(patient.id, chats.doctor, "doctor", "analysis")
    assert (await send(client, patient, chats.with_doctor, [analysis])).status_code == 201
    assert (await send(client, chats.doctor, chats.with_doctor, [doctors])).status_code == 201
    async with session_maker() as session:
        sent = await session.get(Document, analysis)
        kept = await session.get(Document, doctors)
    assert sent is not None
    assert kept is not None
    assert (sent.inbox_status, str(sent.conversation_id)) == ("new", chats.with_doctor)
    assert kept.inbox_status is None  # what a doctor sends is no analysis for the methodists
    methodist = await clinic.staff("methodist")
    inbox = await client.get("/api/v1/analyses/inbox", headers=methodist.headers, params={"limit": 100})
    ids = [d["id"] for d in inbox.json()["items"]]
    while inbox.json()["next_cursor"]:
        inbox = await client.get("/api/v1/analyses/inbox", headers=methodist.headers,
                                 params={"limit": 100, "cursor": inbox.json()["next_cursor"]})
        ids += [d["id"] for d in inbox.json()["items"]]
    assert str(analysis) in ids
    assert str(doctors) not in ids
