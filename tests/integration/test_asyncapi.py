"""The socket's AsyncAPI document: served, complete (every event type, reply and client frame the code knows),
every reference resolving, and true of what the streams really carry: a day of chat, a document and a call,
each stored event checked against its message's payload schema."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any
from uuid import UUID

import jsonschema_rs
import pytest
from litestar.testing import AsyncTestClient
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.chat import streams
from app.chat.models import UserEvent
from app.events import CLIENT_FRAMES, REPLIES, STREAM_EVENTS
from tests.conftest import Session
from tests.integration.test_calls import act, online_visit, start

Maker = async_sessionmaker[AsyncSession]


async def asyncapi(client: AsyncTestClient[Any]) -> dict[str, Any]:
    answer = await client.get("/schema/asyncapi.json")  # no token: it holds no data
    assert answer.status_code == 200, answer.text
    body: dict[str, Any] = answer.json()
    return body


def resolve(document: dict[str, Any], ref: str) -> Any:
    assert ref.startswith("#/"), ref
    node: Any = document
    for part in ref[2:].split("/"):
        assert part in node, f"{ref} does not resolve"
        node = node[part]
    return node


def refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        return ([node["$ref"]] if "$ref" in node else []) + [r for v in node.values() for r in refs(v)]
    if isinstance(node, list):
        return [r for v in node for r in refs(v)]
    return []


async def test_the_document_lists_every_frame_and_every_reference_resolves(client: AsyncTestClient[Any]) -> None:
    document = await asyncapi(client)
    assert document["asyncapi"] == "3.0.0"
    assert document["channels"]["socket"]["address"] == "/api/v1/ws"
    messages = document["components"]["messages"]
    assert set(messages) == set(STREAM_EVENTS) | set(REPLIES) | set(CLIENT_FRAMES)
    operations = document["operations"]
    sent = {resolve(document, m["$ref"])["$ref"].rsplit("/", 1)[1] for m in operations["sendEvents"]["messages"]}
    received = {resolve(document, m["$ref"])["$ref"].rsplit("/", 1)[1]
                for m in operations["receiveFrames"]["messages"]}
    assert (sent, received) == (set(STREAM_EVENTS) | set(REPLIES), set(CLIENT_FRAMES))
    for ref in refs(document):
        resolve(document, ref)
    for name, message in messages.items():  # every payload is a schema a validator takes
        jsonschema_rs.validator_for({**message["payload"], "components": document["components"]})
        assert message["payload"]["properties"]["type"] == {"const": name}


async def test_the_streams_refuse_an_undocumented_event_type(session_maker: Maker, patient: Session) -> None:
    async with session_maker() as session:
        with pytest.raises(ValueError, match="undocumented"):
            await streams.append(session, streams.staged_for(session), {patient.id}, "made.up", {})


async def test_what_the_streams_carry_matches_the_document(
    client: AsyncTestClient[Any], patient: Session, specialist: Callable[..., Any], service: Callable[..., Any],
    visit_until: Callable[..., Any], session_maker: Maker,
) -> None:
    doctor = await specialist()
    visit = await online_visit(patient, doctor, service, visit_until)
    chat = f"/api/v1/chats/{visit.conversation_id}"
    sent = await client.post(f"{chat}/messages", headers=patient.headers, json={"text": "hello", "client_id": "a1"})
    assert sent.status_code == 201, sent.text
    edited = await client.patch(f"{chat}/messages/{sent.json()['id']}", headers=patient.headers,
                                json={"text": "hello again"})
    assert edited.status_code == 200, edited.text
    read = await client.post(f"{chat}/read", headers=doctor.headers, json={"up_to_message_id": sent.json()["id"]})
    assert read.status_code == 204, read.text
    uploaded = await client.post("/api/v1/documents/upload", headers=patient.headers, files={
        "file": ("scan.jpg", b"\xff\xd8\xff\xe0" + os.urandom(2048), "image/jpeg")},
        data={"patient_id": str(patient.id), "kind": "image"})
    assert uploaded.status_code == 201, uploaded.text
    call = await start(client, visit)
    assert (await act(client, patient, call["id"], "accept")).status_code == 200
    media = await client.post(f"/api/v1/calls/{call['id']}/media", headers=patient.headers,
                              json={"audio": False, "video": True})
    assert media.status_code in (200, 204), media.text
    assert (await act(client, doctor, call["id"], "end")).status_code == 200
    missed = await start(client, visit)
    assert (await act(client, patient, missed["id"], "decline")).status_code == 200

    document = await asyncapi(client)
    components = document["components"]
    validators = {name: jsonschema_rs.validator_for({**m["payload"], "components": components})
                  for name, m in components["messages"].items()}
    async with session_maker() as session:
        rows = (await session.execute(select(UserEvent.type, UserEvent.seq, UserEvent.data).where(
            UserEvent.recipient_id.in_([UUID(str(patient.id)), UUID(str(doctor.id))])))).all()
    seen = {row.type for row in rows}
    assert seen >= {"consultation.updated", "conversation.opened", "message.new", "message.updated", "message.read",
                    "document.ready", "call.incoming", "call.accepted", "call.media", "call.ended", "call.declined"}
    for type_, seq, data in rows:
        frame = {"type": type_, "id": str(seq), "data": data}
        errors = [e.message for e in validators[type_].iter_errors(frame)]
        assert not errors, (type_, errors, data)
