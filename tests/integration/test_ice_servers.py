"""GET /api/v1/rtc/ice-servers: STUN for any signed-in user, TURN (credentials in coturn's REST scheme) only for a
participant of a live call."""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from typing import Any

import msgspec
from litestar.testing import AsyncTestClient

from app.settings import Settings
from tests.conftest import Session, refused, running
from tests.integration.test_calls import Visit, act, start, visit  # noqa: F401  (visit: the fixture)

SECRET = "north-wing-coturn-secret"


async def test_turn_credentials_are_coturn_rest_credentials_that_expire(
    test_settings: Settings, client: AsyncTestClient[Any], visit: Visit,  # noqa: F811
) -> None:
    settings = msgspec.structs.replace(
        test_settings, stun_urls="stun:turn.clinic.test:3478",
        turn_urls="turn:turn.clinic.test:3478?transport=udp, turns:turn.clinic.test:5349?transport=tcp",
        turn_secret=SECRET, turn_credential_seconds=600)
    patient = visit.patient
    call = await start(client, visit)
    async with running(settings) as clinic:
        before = int(time.time())
        answer = await clinic.get("/api/v1/rtc/ice-servers", params={"call_id": call["id"]}, headers=patient.headers)
        after = int(time.time())
        refused(await clinic.get("/api/v1/rtc/ice-servers"), 401)
    assert answer.status_code == 200, answer.text
    stun, turn = answer.json()
    assert stun == {"urls": ["stun:turn.clinic.test:3478"]}  # STUN needs no credentials
    assert turn["urls"] == ["turn:turn.clinic.test:3478?transport=udp", "turns:turn.clinic.test:5349?transport=tcp"]
    expiry, _, user = turn["username"].partition(":")
    assert user == str(patient.id)
    assert before + 600 <= int(expiry) <= after + 600
    expected = base64.b64encode(hmac.new(SECRET.encode(), turn["username"].encode(), hashlib.sha1).digest()).decode()
    assert turn["credential"] == expected  # what coturn computes from its static-auth-secret


async def test_without_a_turn_secret_only_stun_is_offered(
    test_settings: Settings, patient: Session, staff: Any,
) -> None:
    settings = msgspec.structs.replace(test_settings, stun_urls="stun:a.clinic.test:3478,stun:b.clinic.test:3478",
                                       turn_urls="turn:turn.clinic.test:3478", turn_secret=None)
    doctor = await staff("doctor", ["endocrinology"])
    async with running(settings) as clinic:
        for who in (patient, doctor):
            answer = await clinic.get("/api/v1/rtc/ice-servers", headers=who.headers)
            assert answer.status_code == 200, answer.text
            assert answer.json() == [{"urls": ["stun:a.clinic.test:3478", "stun:b.clinic.test:3478"]}]


async def test_by_default_no_third_party_server_is_offered(client: AsyncTestClient[Any], patient: Session) -> None:
    answer = await client.get("/api/v1/rtc/ice-servers", headers=patient.headers)
    assert answer.status_code == 200, answer.text
    assert answer.json() == []  # the SFU's own candidates suffice on a reachable network


async def test_turn_only_for_a_participant_of_a_live_call(
    test_settings: Settings, client: AsyncTestClient[Any], visit: Visit, login: Any, new_phone: Any,  # noqa: F811
) -> None:
    settings = msgspec.structs.replace(test_settings, stun_urls="stun:turn.clinic.test:3478",
                                       turn_urls="turn:turn.clinic.test:3478", turn_secret=SECRET)
    assert Settings().turn_credential_seconds == 3600  # a leaked credential relays for an hour at most
    call = await start(client, visit)
    stranger = await login(new_phone())
    stun_only = [{"urls": ["stun:turn.clinic.test:3478"]}]

    async def servers(clinic: AsyncTestClient[Any], who: Session, call_id: str | None) -> Any:
        answer = await clinic.get("/api/v1/rtc/ice-servers", headers=who.headers,
                                  params={"call_id": call_id} if call_id else None)
        assert answer.status_code == 200, answer.text
        return answer.json()

    async with running(settings) as clinic:
        for who in (visit.patient, visit.doctor):
            assert len(await servers(clinic, who, call["id"])) == 2  # STUN and TURN
            assert await servers(clinic, who, None) == stun_only  # no call named: no relay
        assert await servers(clinic, stranger, call["id"]) == stun_only  # not their call
        assert await servers(clinic, stranger, "0191d3a4-5c2e-7b6f-9a1d-3e4f5a6b7c8d") == stun_only
        assert (await act(clinic, visit.doctor, call["id"], "end")).status_code == 200
        assert await servers(clinic, visit.patient, call["id"]) == stun_only  # ended


def test_the_coturn_example_relays_only_to_the_sfu() -> None:
    from pathlib import Path

    lines = [line.strip() for line in (Path(__file__).parents[2] / "infra/coturn/turnserver.conf").read_text()
             .splitlines() if line.strip() and not line.lstrip().startswith("#")]
    assert "denied-peer-ip=0.0.0.0-255.255.255.255" in lines
    assert "denied-peer-ip=::-ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff" in lines
    assert [line for line in lines if line.startswith("allowed-peer-ip=")]  # the SFU's addresses, nothing else
    assert "allow-loopback-peers" not in lines
