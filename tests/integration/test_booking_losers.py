"""A booking that loses its slot writes nothing: no visit, card, conversation, reminder, outbox row or event."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from litestar.testing import AsyncTestClient
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.accounts.models import User
from app.chat.models import Conversation, UserEvent
from app.consultations.models import Consultation
from app.notifications.models import Reminder
from app.outbox import OutboxEvent
from tests.integration.conftest import free_slots

COUNTED = (Consultation, Conversation, Reminder, OutboxEvent, UserEvent)


async def counts(session_maker: async_sessionmaker[AsyncSession]) -> dict[str, int]:
    async with session_maker() as session:
        return {m.__tablename__: int(await session.scalar(select(func.count()).select_from(m)) or 0)
                for m in COUNTED}


async def test_the_losers_of_a_slot_leave_no_row_behind(
    client: AsyncTestClient[Any], specialist: Callable[..., Any], service: Callable[..., Any],
    login: Callable[[str], Any], new_phone: Callable[[], str], session_maker: async_sessionmaker[AsyncSession],
) -> None:
    doctor, visit_type = await specialist(), await service()
    winner, *losers = [await login(new_phone()) for _ in range(6)]
    slot = (await free_slots(client, winner, doctor.id))[0]
    body = {"slot_id": slot["id"], "service_id": visit_type["id"], "format": "in_person",
            "patient_birth_date": "1990-05-01", "patient_sex": "female"}  # what a card lacks is recorded ...

    before = await counts(session_maker)
    won = await client.post("/api/v1/consultations", headers=winner.headers, json=body)
    assert won.status_code == 201, won.text
    after_win = await counts(session_maker)
    assert after_win["consultation"] == before["consultation"] + 1
    assert after_win["outbox_event"] == before["outbox_event"] + 1  # consultation.updated
    assert after_win["user_event"] > before["user_event"]  # the doctor's and the patient's live events
    assert after_win["conversation"] == before["conversation"] + 1

    for loser in losers:
        lost = await client.post("/api/v1/consultations", headers=loser.headers, json=body)
        assert lost.status_code == 409
        assert lost.json()["extra"]["reason"] == "slot_taken"
    assert await counts(session_maker) == after_win
    async with session_maker() as session:
        cards = (await session.execute(select(User.id, User.birth_date, User.sex)
                                       .where(User.id.in_([p.id for p in (winner, *losers)])))).all()
    filled = {row.id: (row.birth_date, row.sex) for row in cards}
    assert filled[winner.id][0] is not None  # ... by the winner only
    assert filled[winner.id][1] == "female"
    assert all(filled[p.id] == (None, None) for p in losers)
