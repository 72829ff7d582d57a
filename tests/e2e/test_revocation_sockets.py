"""A revoked login's sockets close on every server process: that login's only, or all of a changed account's."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any
from uuid import uuid4

import httpx
import websockets
from websockets.asyncio.client import ClientConnection

from app.accounts.models import User
from app.revocation import CLOSE_REVOKED
from tests.conftest import Session
from tests.e2e.test_gateway import WAIT, nothing_pending, ws_url


async def closed_with(socket: ClientConnection) -> int | None:
    """The close code the server ends this socket with (frames before it are skipped)."""
    while True:
        try:
            await asyncio.wait_for(socket.recv(), WAIT)
        except websockets.ConnectionClosed as closed:
            return closed.rcvd.code if closed.rcvd else None


async def test_logout_closes_that_logins_sockets_on_every_process(
    api: list[str], patient: Session, accounts_for: Any
) -> None:
    async with accounts_for() as accounts:  # a second login of the same patient, on another device
        user = await accounts.session.get(User, patient.id)
        assert user is not None
        other = await accounts._start_session(user, family_id=uuid4())
    web = Session(id=patient.id, phone=patient.phone, access=other.access_token, refresh=other.refresh_token)
    async with websockets.connect(ws_url(api[-1], patient)) as phone_ws, \
            websockets.connect(ws_url(api[-1], web)) as web_ws:
        await nothing_pending(phone_ws)  # both registered before the logout
        await nothing_pending(web_ws)
        async with httpx.AsyncClient(base_url=api[0], headers=patient.headers) as http:
            out = await http.post("/api/v1/auth/logout", json={"refresh_token": patient.refresh})
        assert out.status_code == 204
        assert await closed_with(phone_ws) == CLOSE_REVOKED
        assert await nothing_pending(web_ws) == []  # the other login's socket stays open


async def test_a_role_change_closes_every_socket_of_the_account(
    api: list[str], admin: Session, staff: Callable[..., Any]
) -> None:
    registrar: Session = await staff("registrar")
    async with websockets.connect(ws_url(api[-1], registrar)) as socket:
        await nothing_pending(socket)
        async with httpx.AsyncClient(base_url=api[0], headers=admin.headers) as http:
            changed = await http.patch(f"/api/v1/staff/{registrar.id}", json={"roles": ["registrar", "methodist"]})
        assert changed.status_code == 200, changed.text
        assert await closed_with(socket) == CLOSE_REVOKED
