"""Access tokens are checked like an attacker would try them; refresh tokens rotate and detect reuse."""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Callable
from typing import Any
from uuid import uuid4

import jwt
import msgspec
from litestar.testing import AsyncTestClient

from app.accounts.models import User
from app.settings import Settings
from tests.conftest import Session, running


def forged(token: str, **changes: Any) -> str:
    header, payload, signature = token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=="))
    claims.update(changes)
    body = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    return f"{header}.{body}.{signature}"


def signing_key(settings: Settings) -> tuple[str, str]:
    return settings.signing_keys[0]


async def me_status(client: AsyncTestClient[Any], token: str) -> tuple[int, str | None]:
    answer = await client.get("/api/v1/me", headers={"Authorization": f"Bearer {token}"})
    return answer.status_code, answer.json().get("extra", {}).get("reason")


async def test_tampered_payload_is_refused(client: AsyncTestClient[Any], patient: Session) -> None:
    assert await me_status(client, forged(patient.access, roles=["admin"])) == (401, "token_invalid")


async def test_alg_none_is_refused(client: AsyncTestClient[Any], patient: Session) -> None:
    claims = jwt.decode(patient.access, options={"verify_signature": False})
    unsigned = jwt.encode(claims, key=None, algorithm="none", headers={"kid": "t1"})
    assert await me_status(client, unsigned) == (401, "token_invalid")


async def test_another_algorithm_with_the_same_key_is_refused(
    client: AsyncTestClient[Any], patient: Session, test_settings: Settings
) -> None:
    kid, secret = signing_key(test_settings)
    claims = jwt.decode(patient.access, options={"verify_signature": False})
    secret = secret * 2  # long enough for HS512; the server must still refuse the algorithm
    hs512 = jwt.encode(claims, secret, algorithm="HS512", headers={"kid": kid})
    assert await me_status(client, hs512) == (401, "token_invalid")


async def test_expired_token_is_refused(
    client: AsyncTestClient[Any], patient: Session, test_settings: Settings
) -> None:
    kid, secret = signing_key(test_settings)
    now = int(time.time())
    old = jwt.encode({"sub": str(patient.id), "typ": "access", "iat": now - 1000, "exp": now - 100,
                      "roles": ["patient"]}, secret, algorithm="HS256", headers={"kid": kid})
    assert await me_status(client, old) == (401, "token_expired")


async def test_wrong_type_and_missing_claims_are_refused(
    client: AsyncTestClient[Any], patient: Session, test_settings: Settings
) -> None:
    kid, secret = signing_key(test_settings)
    now = int(time.time())
    base = {"sub": str(patient.id), "typ": "access", "iat": now, "exp": now + 60, "roles": ["patient"]}
    refresh_typed = jwt.encode({**base, "typ": "refresh"}, secret, algorithm="HS256", headers={"kid": kid})
    assert await me_status(client, refresh_typed) == (401, "token_invalid")
    for claim in ("exp", "iat", "sub", "typ"):
        partial = {k: v for k, v in base.items() if k != claim}
        token = jwt.encode(partial, secret, algorithm="HS256", headers={"kid": kid})
        assert await me_status(client, token) == (401, "token_invalid"), claim
    unknown_kid = jwt.encode(base, secret, algorithm="HS256", headers={"kid": "nope"})
    assert await me_status(client, unknown_kid) == (401, "token_invalid")
    bad_role = jwt.encode({**base, "roles": ["superuser"]}, secret, algorithm="HS256", headers={"kid": kid})
    assert await me_status(client, bad_role) == (401, "token_invalid")
    for junk in ("", "x", "a.b.c", "Bearer"):
        assert (await me_status(client, junk))[0] == 401
    basic = await client.get("/api/v1/me", headers={"Authorization": "Basic dXNlcjpwYXNz"})
    assert basic.status_code == 401


async def test_rotation_old_key_still_verifies_new_key_signs(test_settings: Settings, patient: Session) -> None:
    old_kid, old_secret = signing_key(test_settings)
    rotated = msgspec.structs.replace(test_settings, jwt_keys=f"t2={'n' * 40},{old_kid}={old_secret}")
    async with running(rotated) as client:
        assert await me_status(client, patient.access) == (200, None)  # issued with the old key
        fresh = (await client.post("/api/v1/auth/refresh", json={"refresh_token": patient.refresh})).json()
        assert jwt.get_unverified_header(fresh["access_token"])["kid"] == "t2"
    retired = msgspec.structs.replace(test_settings, jwt_keys=f"t2={'n' * 40}")
    async with running(retired) as client:
        assert await me_status(client, patient.access) == (401, "token_invalid")
        assert await me_status(client, fresh["access_token"]) == (200, None)


async def test_refresh_rotates_and_reuse_revokes_the_family(client: AsyncTestClient[Any], patient: Session) -> None:
    first = await client.post("/api/v1/auth/refresh", json={"refresh_token": patient.refresh})
    assert first.status_code == 200
    second_refresh = first.json()["refresh_token"]
    assert second_refresh != patient.refresh
    assert await me_status(client, first.json()["access_token"]) == (200, None)
    # the spent token comes back (a thief replays it): refused, and the whole login is revoked
    replay = await client.post("/api/v1/auth/refresh", json={"refresh_token": patient.refresh})
    assert replay.status_code == 401
    assert replay.json()["extra"]["reason"] == "refresh_reused"
    legit = await client.post("/api/v1/auth/refresh", json={"refresh_token": second_refresh})
    assert legit.status_code == 401
    assert legit.json()["extra"]["reason"] == "refresh_reused"


async def test_reuse_revokes_only_that_login(
    client: AsyncTestClient[Any], login: Callable[[str], Any], patient: Session, test_settings: Settings,
    accounts_for: Any,
) -> None:
    async with accounts_for() as accounts:  # a second login of the same person, e.g. on the web
        user = await accounts.session.get(User, patient.id)
        assert user is not None
        other = await accounts._start_session(user, family_id=uuid4())
    await client.post("/api/v1/auth/refresh", json={"refresh_token": patient.refresh})
    await client.post("/api/v1/auth/refresh", json={"refresh_token": patient.refresh})  # reuse
    still = await client.post("/api/v1/auth/refresh", json={"refresh_token": other.refresh_token})
    assert still.status_code == 200


async def test_unknown_refresh_token_is_refused(client: AsyncTestClient[Any]) -> None:
    answer = await client.post("/api/v1/auth/refresh", json={"refresh_token": "made-up"})
    assert answer.status_code == 401
    assert answer.json()["extra"]["reason"] == "refresh_invalid"


async def test_logout_revokes_the_refresh_token(client: AsyncTestClient[Any], patient: Session) -> None:
    out = await client.post("/api/v1/auth/logout", headers=patient.headers, json={"refresh_token": patient.refresh})
    assert out.status_code == 204
    after = await client.post("/api/v1/auth/refresh", json={"refresh_token": patient.refresh})
    assert after.status_code == 401


async def test_logout_without_a_token_ends_every_session(
    client: AsyncTestClient[Any], patient: Session
) -> None:
    out = await client.post("/api/v1/auth/logout", headers=patient.headers)
    assert out.status_code == 204
    assert (await client.post("/api/v1/auth/refresh", json={"refresh_token": patient.refresh})).status_code == 401


async def test_logout_cannot_revoke_someone_elses_login(
    client: AsyncTestClient[Any], login: Callable[[str], Any], new_phone: Callable[[], str], patient: Session
) -> None:
    intruder = await login(new_phone())
    await client.post("/api/v1/auth/logout", headers=intruder.headers, json={"refresh_token": patient.refresh})
    assert (await client.post("/api/v1/auth/refresh", json={"refresh_token": patient.refresh})).status_code == 200
