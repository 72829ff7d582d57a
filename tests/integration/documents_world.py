"""A small clinic for the document tests, built once per module: patients, a guardian with a dependent, every
staff role, visits that put patients in care, and documents written straight into the table (status ready: the
bytes do not matter to who may see them)."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any
from uuid import UUID

from litestar.testing import AsyncTestClient
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from uuid_utils.compat import uuid7

from app.access import Role, Viewer
from app.accounts.service import AccountService
from app.accounts.tokens import TokenIssuer
from app.documents.models import Document
from app.documents.service import DocumentService
from app.documents.storage import new_key
from app.limits import InProcessLimiter
from app.notifications.sms import LogSms
from app.settings import Settings
from tests.conftest import Session, read_code

ALL_WEEK = [{"weekday": d, "start": "00:00", "end": "24:00"} for d in range(7)]


def a_phone() -> str:
    return f"+7925{random.randrange(1_000_000, 9_999_999):07d}"


@dataclass
class Clinic:
    """Signs people in and arranges what the tests need, through the API where it can."""

    client: AsyncTestClient[Any]
    settings: Settings
    sessions: async_sessionmaker[AsyncSession]
    admin: Session | None = None
    registrar: Session | None = None
    roles: dict[UUID, frozenset[Role]] = field(default_factory=dict)

    async def sign_in(self, phone: str) -> Session:
        assert (await self.client.post("/api/v1/auth/otp", json={"phone": phone})).status_code == 202
        answer = await self.client.post("/api/v1/auth/token", json={
            "phone": phone, "code": read_code(self.settings, phone)})
        assert answer.status_code == 200, answer.text
        body = answer.json()
        session = Session(id=UUID(body["user"]["id"]), phone=phone, access=body["access_token"],
                          refresh=body["refresh_token"])
        self.roles[session.id] = frozenset(Role(r) for r in body["user"]["roles"])
        return session

    def accounts(self, session: AsyncSession) -> AccountService:
        return AccountService(session, self.settings, TokenIssuer(self.settings), InProcessLimiter(),
                              LogSms(self.settings.resolved_sms_log_path))

    def documents(self, session: AsyncSession) -> DocumentService:
        return DocumentService(session, self.settings, self.accounts(session))

    def viewer(self, who: Session) -> Viewer:
        return Viewer(id=who.id, roles=self.roles[who.id])

    async def start(self) -> None:
        phone = a_phone()
        async with self.sessions() as session:
            await self.accounts(session).ensure_admin(phone, "Test Admin")
            await session.commit()
        self.admin = await self.sign_in(phone)
        self.registrar = await self.staff("registrar")

    async def patient(self) -> Session:
        return await self.sign_in(a_phone())

    async def staff(self, role: str, specialties: list[str] | None = None) -> Session:
        assert self.admin is not None
        phone = a_phone()
        answer = await self.client.post("/api/v1/staff", headers=self.admin.headers, json={
            "phone": phone, "full_name": f"Test {role}", "role": role, "specialties": specialties or []})
        assert answer.status_code == 201, answer.text
        return await self.sign_in(phone)

    async def specialist(self, role: str, specialty: str) -> Session:
        assert self.admin is not None
        member = await self.staff(role, [specialty])
        answer = await self.client.put(f"/api/v1/specialists/{member.id}/schedule", headers=self.admin.headers,
                                       json={"timezone": "Europe/Moscow", "slot_minutes": 30, "horizon_days": 2,
                                             "weekly": ALL_WEEK})
        assert answer.status_code == 200, answer.text
        return member

    async def service(self, specialty: str, *, in_person_only: bool = False, stage: str = "first") -> dict[str, Any]:
        assert self.admin is not None
        answer = await self.client.post("/api/v1/services", headers=self.admin.headers, json={
            "specialty": specialty, "title": f"{specialty} visit", "duration_minutes": 30, "price": "1000.00",
            "in_person_only": in_person_only, "stage": stage})
        assert answer.status_code == 201, answer.text
        body: dict[str, Any] = answer.json()
        return body

    async def visit(self, patient: Session, specialist: Session, service: dict[str, Any], nth: int,
                    patient_id: UUID | None = None) -> dict[str, Any]:
        """A confirmed in-person visit in the nth free slot (patients hold one visit at a time: pick apart)."""
        assert self.registrar is not None
        slots = await self.client.get(f"/api/v1/specialists/{specialist.id}/slots", headers=patient.headers)
        slot = slots.json()["items"][nth]
        body = {"slot_id": slot["id"], "service_id": service["id"], "format": "in_person"}
        if patient_id is not None:
            body["patient_id"] = str(patient_id)
        answer = await self.client.post("/api/v1/consultations", headers=patient.headers, json=body)
        assert answer.status_code == 201, answer.text
        visit: dict[str, Any] = answer.json()
        if visit["status"] == "pending_confirmation":
            confirmed = await self.client.post(f"/api/v1/consultations/{visit['id']}/confirm",
                                               headers=self.registrar.headers)
            assert confirmed.status_code == 200, confirmed.text
            visit = confirmed.json()
        return visit

    async def dependent(self, guardian: Session) -> UUID:
        answer = await self.client.post("/api/v1/me/dependents", headers=guardian.headers, json={
            "full_name": "Little One", "birth_date": "2019-05-01", "relation": "child",
            "legal_basis": "birth certificate II-AB 123456"})
        assert answer.status_code == 201, answer.text
        return UUID(answer.json()["id"])

    async def document(self, patient_id: UUID, author: Session, author_role: str, kind: str, *,
                       status: str = "ready", consultation_id: Any = None, inbox_status: str | None = None,
                       filename: str = "result.pdf") -> UUID:
        document = Document(id=uuid7(), patient_id=patient_id, kind=kind, filename=filename,
                            content_type="application/pdf", size=1234, status=status, author_id=author.id,
                            author_role=author_role,
                            consultation_id=UUID(str(consultation_id)) if consultation_id else None,
                            storage_key=new_key("test"), inbox_status=inbox_status)
        async with self.sessions() as session:
            session.add(document)
            await session.commit()
        return document.id
