"""GET /api/v1/rtc/ice-servers: STUN and TURN for any signed-in user, TURN credentials in coturn's REST scheme."""

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

SECRET = "north-wing-coturn-secret"


async def test_turn_credentials_are_coturn_rest_credentials_that_expire(
    test_settings: Settings, client: AsyncTestClient[Any], patient: Session,
) -> None:
    settings = msgspec.structs.replace(
        test_settings, stun_urls="stun:turn.clinic.test:3478",
        turn_urls="turn:turn.clinic.test:3478?transport=udp, turns:turn.clinic.test:5349?transport=tcp",
        turn_secret=SECRET, turn_credential_seconds=600)
    async with running(settings) as clinic:
        before = int(time.time())
        answer = await clinic.get("/api/v1/rtc/ice-servers", headers=patient.headers)
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
