"""Fixtures for scheduling and consultations: specialists with a schedule, services, booked visits."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from litestar.testing import AsyncTestClient

from tests.conftest import Session

ALL_WEEK = [{"weekday": d, "start": "00:00", "end": "24:00"} for d in range(7)]


@pytest.fixture
def service(client: AsyncTestClient[Any], admin: Session) -> Callable[..., Any]:
    """Create a service through the admin API."""

    async def make(specialty: str = "endocrinology", *, in_person_only: bool = False, stage: str = "first",
                   price: str = "3000.00", duration: int = 30) -> dict[str, Any]:
        answer = await client.post("/api/v1/services", headers=admin.headers, json={
            "specialty": specialty, "title": f"{specialty} visit", "duration_minutes": duration, "price": price,
            "in_person_only": in_person_only, "stage": stage})
        assert answer.status_code == 201, answer.text
        body: dict[str, Any] = answer.json()
        return body

    return make


@pytest.fixture
def specialist(client: AsyncTestClient[Any], admin: Session, staff: Callable[..., Any]) -> Callable[..., Any]:
    """A signed-in specialist whose schedule covers every hour of the next days (so slots are always ahead)."""

    async def make(role: str = "doctor", specialties: list[str] | None = None, *, days: int = 2,
                   timezone: str = "Europe/Moscow", slot_minutes: int = 30) -> Session:
        member: Session = await staff(role, specialties or ["endocrinology"])
        answer = await client.put(f"/api/v1/specialists/{member.id}/schedule", headers=admin.headers, json={
            "timezone": timezone, "slot_minutes": slot_minutes, "horizon_days": days, "weekly": ALL_WEEK})
        assert answer.status_code == 200, answer.text
        return member

    return make


async def free_slots(client: AsyncTestClient[Any], who: Session, specialist_id: Any, **params: str) -> list[Any]:
    answer = await client.get(f"/api/v1/specialists/{specialist_id}/slots", headers=who.headers, params=params)
    assert answer.status_code == 200, answer.text
    items: list[Any] = answer.json()["items"]
    return items


@pytest.fixture
def book(client: AsyncTestClient[Any]) -> Callable[..., Any]:
    """Book the n-th free slot of a specialist; returns the raw answer."""

    async def do(who: Session, specialist: Session, service: dict[str, Any], *, fmt: str = "in_person",
                 nth: int = 0, **extra: Any) -> Any:
        slot = (await free_slots(client, who, specialist.id))[nth]
        return await client.post("/api/v1/consultations", headers=who.headers, json={
            "slot_id": slot["id"], "service_id": service["id"], "format": fmt, **extra})

    return do


@pytest.fixture
def visit_until(client: AsyncTestClient[Any], book: Callable[..., Any],
                staff: Callable[..., Any]) -> Callable[..., Any]:
    """Book the n-th free slot (nth >= 1: at least half an hour ahead, so no slot begins while the test runs)
    and take the visit to `until`: booked, confirmed, in_progress or completed. A first booking is confirmed
    by a registrar, made once per test."""
    registrars: list[Session] = []

    async def advance(who: Session, visit: dict[str, Any], command: str) -> dict[str, Any]:
        answer = await client.post(f"/api/v1/consultations/{visit['id']}/{command}", headers=who.headers)
        assert answer.status_code == 200, answer.text
        body: dict[str, Any] = answer.json()
        return body

    async def do(patient: Session, specialist: Session, service: dict[str, Any], until: str = "confirmed", *,
                 nth: int = 0, **extra: Any) -> dict[str, Any]:
        answer = await book(patient, specialist, service, nth=nth, **extra)
        assert answer.status_code == 201, answer.text
        visit: dict[str, Any] = answer.json()
        if until == "booked":
            return visit
        if visit["status"] == "pending_confirmation":
            if not registrars:
                registrars.append(await staff("registrar"))
            visit = await advance(registrars[0], visit, "confirm")
        if until in ("in_progress", "completed"):
            visit = await advance(specialist, visit, "start")
        if until == "completed":
            visit = await advance(specialist, visit, "complete")
        assert visit["status"] == until, visit
        return visit

    return do
