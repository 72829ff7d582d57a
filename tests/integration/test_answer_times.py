"""Times in REST answers carry the caller's offset (their zone from the access token, or `tz=` where a route
takes it); the same instant reads differently to people in different zones, and never as a bare `Z` to them."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from typing import Any

from litestar.testing import AsyncTestClient

from tests.conftest import Session

VLADIVOSTOK = dt.timedelta(hours=10)
MOSCOW = dt.timedelta(hours=3)


def offset(value: str) -> dt.timedelta | None:
    return dt.datetime.fromisoformat(value).utcoffset()


async def test_a_patient_in_vladivostok_reads_times_at_plus_ten(
    client: AsyncTestClient[Any], patient: Session, specialist: Callable[..., Any],
    service: Callable[..., Any], book: Callable[..., Any], visit_until: Callable[..., Any],
) -> None:
    moved = await client.patch("/api/v1/me", headers=patient.headers, json={"timezone": "Asia/Vladivostok"})
    assert moved.status_code == 200, moved.text
    renewed = await client.post("/api/v1/auth/refresh", json={"refresh_token": patient.refresh})
    assert renewed.status_code == 200, renewed.text  # the new zone rides in the next access token
    far_east = Session(id=patient.id, phone=patient.phone, access=renewed.json()["access_token"],
                       refresh=renewed.json()["refresh_token"])
    doctor, visit_type = await specialist(), await service()
    booked = await book(far_east, doctor, visit_type, nth=1)
    assert booked.json()["starts_at"].endswith("+10:00"), booked.text
    assert offset(booked.json()["ends_at"]) == VLADIVOSTOK
    confirmed = await visit_until(far_east, doctor, visit_type, "confirmed", nth=2)  # confirmed by a registrar
    assert offset(confirmed["starts_at"]) == MOSCOW  # the registrar's answer, in the registrar's zone
    mine = await client.get(f"/api/v1/consultations/{confirmed['id']}", headers=far_east.headers)
    assert mine.json()["starts_at"].endswith("+10:00"), mine.text
    visit = mine.json()
    calendar = (await client.get("/api/v1/consultations", headers=far_east.headers)).json()["items"]
    assert {offset(c["starts_at"]) for c in calendar} == {VLADIVOSTOK}
    theirs = await client.get(f"/api/v1/consultations/{visit['id']}", headers=doctor.headers)
    assert theirs.json()["starts_at"].endswith("+03:00"), theirs.text  # the doctor's zone: the clinic's
    assert dt.datetime.fromisoformat(theirs.json()["starts_at"]) == dt.datetime.fromisoformat(visit["starts_at"])
    in_utc = await client.get("/api/v1/consultations", headers=far_east.headers, params={"tz": "UTC"})
    assert {offset(c["starts_at"]) for c in in_utc.json()["items"]} == {dt.timedelta(0)}

    sent = await client.post(f"/api/v1/chats/{visit['conversation_id']}/messages", headers=far_east.headers,
                             json={"client_id": "tz-1", "text": "hello"})
    assert sent.status_code == 201, sent.text
    assert offset(sent.json()["created_at"]) == VLADIVOSTOK  # built by the send queue, answered in the zone
    history = await client.get(f"/api/v1/chats/{visit['conversation_id']}/messages", headers=far_east.headers)
    assert {offset(m["created_at"]) for m in history.json()["items"]} == {VLADIVOSTOK}
    chats = (await client.get("/api/v1/chats", headers=far_east.headers)).json()["items"]
    assert offset(chats[0]["last_message"]["created_at"]) == VLADIVOSTOK
    device = await client.post("/api/v1/devices", headers=far_east.headers,
                               json={"platform": "ios", "push_token": f"tz-{far_east.id}"})
    assert offset(device.json()["created_at"]) == VLADIVOSTOK
    waiting = await client.post("/api/v1/waitlist", headers=far_east.headers, json={"specialty": "endocrinology"})
    assert waiting.status_code == 201, waiting.text
    assert offset(waiting.json()["created_at"]) == VLADIVOSTOK


async def test_an_unknown_zone_is_a_422(client: AsyncTestClient[Any], patient: Session) -> None:
    for tz in ("Mars/Olympus", "../../etc/passwd", "x" * 300, ""):
        answer = await client.get("/api/v1/consultations", headers=patient.headers, params={"tz": tz})
        if tz == "":
            assert answer.status_code == 200  # no zone given: the caller's own
            continue
        assert answer.status_code == 422, (tz, answer.text)
        assert answer.json()["extra"]["reason"] in ("timezone_invalid", "invalid_input")


async def test_clinic_zone_for_a_token_without_one(client: AsyncTestClient[Any], patient: Session,
                                                   test_settings: Any) -> None:
    bare = client.app.state.tokens.issue_access(patient.id, ["patient"])  # issued before zones rode in tokens
    device = await client.post("/api/v1/devices", headers={"Authorization": f"Bearer {bare}"},
                               json={"platform": "android", "push_token": f"bare-{patient.id}"})
    assert device.status_code == 201, device.text
    assert offset(device.json()["created_at"]) == MOSCOW  # settings.clinic_timezone
    assert test_settings.clinic_timezone == "Europe/Moscow"
