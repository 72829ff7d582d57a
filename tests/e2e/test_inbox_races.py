"""Two methodists handling one analysis at once, over real HTTP to real server processes (requests truly in
parallel): exactly one forward or processed mark goes through, the other is 409 inbox_status_changed."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
from litestar.testing import AsyncTestClient
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.settings import Settings
from tests.conftest import Session
from tests.integration.documents_world import Clinic

ROUNDS = 8


async def both_at_once(api: list[str], requests: list[tuple[Session, str, dict[str, Any] | None]]) -> list[Any]:
    clients = [httpx.AsyncClient(base_url=api[i % len(api)], headers=who.headers)
               for i, (who, _, _) in enumerate(requests)]
    try:  # open the connections first, so the two requests leave together
        await asyncio.gather(*(c.get("/health/ready") for c in clients))
        return list(await asyncio.gather(*(c.post(path, json=body)
                                           for c, (_, path, body) in zip(clients, requests, strict=True))))
    finally:
        for c in clients:
            await c.aclose()


async def test_parallel_moves_of_one_analysis_let_one_through(
        api: list[str], client: AsyncTestClient[Any], test_settings: Settings,
        session_maker: async_sessionmaker[AsyncSession]) -> None:
    clinic = Clinic(client, test_settings, session_maker)
    await clinic.start()
    patient = await clinic.patient()
    one, two = await clinic.staff("methodist"), await clinic.staff("methodist")
    doctor = await clinic.specialist("doctor", "endocrinology")
    other = await clinic.specialist("doctor", "endocrinology")
    for n in range(ROUNDS):  # (a forward and a processed mark may both pass: forwarded, then processed)
        analysis = await clinic.document(patient.id, patient, "patient", "analysis", inbox_status="new")
        commands: list[tuple[str, dict[str, Any] | None]] = [
            ("forward", {"specialist_id": str(doctor.id)}), ("forward", {"specialist_id": str(other.id)})
        ] if n % 2 else [("processed", None)] * 2
        answers = await both_at_once(api, [(who, f"/api/v1/documents/{analysis}/{command}", body)
                                           for who, (command, body) in zip((one, two), commands, strict=True)])
        assert sorted(a.status_code for a in answers) == [200, 409], [a.text for a in answers]
        lost = next(a for a in answers if a.status_code == 409)
        assert lost.json()["extra"]["reason"] == "inbox_status_changed"
