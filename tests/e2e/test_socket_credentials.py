"""Socket credentials against a real server: ticket, subprotocol and ?token=, and no secret in any log line."""

from __future__ import annotations

import asyncio
import re
import uuid
from collections.abc import Callable
from typing import Any
from uuid import UUID

import httpx
import pytest
import websockets
from litestar.testing import AsyncTestClient

from app.settings import Settings
from tests.conftest import Session, read_code
from tests.e2e.conftest import log_path, servers
from tests.e2e.test_gateway import frames_until, nothing_pending, send


async def open_chat_for(client: AsyncTestClient[Any], patient: Session, specialist: Callable[..., Any],
                        service: Callable[..., Any], book: Callable[..., Any], staff: Callable[..., Any],
                        ) -> tuple[str, Session]:
    """A confirmed visit of `patient` with a new doctor: the conversation id of their open chat."""
    doctor, visit_type = await specialist(), await service()
    visit = (await book(patient, doctor, visit_type)).json()
    registrar = await staff("registrar")
    confirmed = await client.post(f"/api/v1/consultations/{visit['id']}/confirm", headers=registrar.headers)
    assert confirmed.status_code == 200, confirmed.text
    return str(visit["conversation_id"]), doctor


def ws_base(base: str) -> str:
    return base.replace("http://", "ws://") + "/api/v1/ws"


def appears(secret: str, text: str) -> bool:
    """`secret` occurs as a whole word (a code is not found inside a timestamp or a hex id)."""
    return re.search(rf"(?<![\w.]){re.escape(secret)}(?![\w.])", text) is not None


async def test_no_token_code_phone_name_or_text_reaches_a_log(
    test_settings: Settings, client: AsyncTestClient[Any], new_phone: Callable[[], str],
    specialist: Callable[..., Any], service: Callable[..., Any], book: Callable[..., Any], staff: Callable[..., Any],
) -> None:
    phone = new_phone()
    name, text = f"Zinaida Logsecret{uuid.uuid4().hex[:6]}", f"my private symptom {uuid.uuid4().hex}"
    async with servers(test_settings, 1, LOG_LEVEL="INFO", LOG_REQUESTS="true") as (base,), \
            httpx.AsyncClient(base_url=base) as http:
        assert (await http.post("/api/v1/auth/otp", json={"phone": phone})).status_code == 202
        code = read_code(test_settings, phone)
        wrong = await http.post("/api/v1/auth/token", json={"phone": phone,
                                                            "code": "000000" if code != "000000" else "111111"})
        assert wrong.status_code in (401, 422), wrong.text
        signed = await http.post("/api/v1/auth/token", json={"phone": phone, "code": code})
        assert signed.status_code == 200, signed.text
        access, refresh = signed.json()["access_token"], signed.json()["refresh_token"]
        headers = {"Authorization": f"Bearer {access}"}
        patient = Session(id=UUID(signed.json()["user"]["id"]), phone=phone, access=access, refresh=refresh)
        conversation, doctor = await open_chat_for(client, patient, specialist, service, book, staff)
        renamed = await http.patch("/api/v1/me", json={"full_name": name}, headers=headers)
        assert renamed.status_code == 200, renamed.text
        issued = await http.post("/api/v1/ws/ticket", headers=headers)
        assert issued.status_code == 201, issued.text
        ticket = issued.json()["ticket"]
        assert 0 < issued.json()["expires_in"] <= 30

        async with websockets.connect(f"{ws_base(base)}?ticket={ticket}") as by_ticket, \
                websockets.connect(ws_base(base), subprotocols=["bearer", access]) as by_protocol, \
                websockets.connect(f"{ws_base(base)}?token={access}") as by_token:  # type: ignore[list-item]
            assert by_protocol.subprotocol == "bearer"
            for socket in (by_ticket, by_protocol, by_token):
                await nothing_pending(socket)
            sent = await send(base, doctor, conversation, text)
            for socket in (by_ticket, by_protocol, by_token):  # each socket is the patient's
                frames = await frames_until(socket, lambda f: f["type"] == "message.new")
                assert frames[-1]["data"]["id"] == sent["id"]

        # refusals, each of which a careless server would log with its secret
        with pytest.raises(websockets.exceptions.InvalidStatus):  # a ticket is good once
            async with websockets.connect(f"{ws_base(base)}?ticket={ticket}"):
                pass
        with pytest.raises(websockets.exceptions.InvalidStatus):
            async with websockets.connect(f"{ws_base(base)}?token={access[:-4]}AAAA"):
                pass
        assert (await http.get("/api/v1/me", headers={"Authorization": f"Bearer {access[:-4]}AAAA"})
                ).status_code == 401
        assert (await http.post("/api/v1/auth/refresh", json={"refresh_token": refresh})).status_code == 200
        reused = await http.post("/api/v1/auth/refresh", json={"refresh_token": refresh})
        assert reused.status_code == 401, reused.text
    logs = log_path(test_settings, base).read_text()
    assert "WebSocket /api/v1/ws" in logs  # INFO lines were captured: uvicorn's and our access log
    assert '"logger": "app.access"' in logs
    assert "token=[redacted]" in logs  # uvicorn's line for the ?token= socket, its token gone
    random = {"access token": access, "refresh token": refresh, "ticket": ticket}
    words = {"login code": code, "phone": phone, "phone digits": phone.lstrip("+"), "name": name,
             "surname": name.split()[1], "message text": text}
    leaked = [what for what, secret in random.items() if secret in logs or secret[-16:] in logs]  # whole or tail
    leaked += [what for what, word in words.items() if appears(word, logs)]
    assert leaked == []


async def test_a_ticket_is_good_once_and_only_briefly(test_settings: Settings, patient: Session) -> None:
    async with servers(test_settings, 1, WS_TICKET_SECONDS="0.3") as (base,), \
            httpx.AsyncClient(base_url=base, headers=patient.headers) as http:
        fresh = (await http.post("/api/v1/ws/ticket")).json()["ticket"]
        stale = (await http.post("/api/v1/ws/ticket")).json()["ticket"]
        async with websockets.connect(f"{ws_base(base)}?ticket={fresh}") as socket:
            await nothing_pending(socket)
        await asyncio.sleep(0.6)  # a ticket's life is time itself: nothing to await but the clock
        for ticket in (fresh, stale, "made-up"):
            with pytest.raises(websockets.exceptions.InvalidStatus) as refused:
                async with websockets.connect(f"{ws_base(base)}?ticket={ticket}"):
                    pass
            assert refused.value.response.status_code == 403  # a refused handshake: uvicorn answers 403
        anonymous = await http.post("/api/v1/ws/ticket", headers={"Authorization": ""})
        assert anonymous.status_code == 401
