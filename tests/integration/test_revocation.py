"""Signing out, a reused refresh token, deactivation and a role change end access at once, on every instance."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any
from uuid import uuid4

import jwt
import msgspec
import pytest
from litestar.testing import AsyncTestClient

from app.access import Role
from app.accounts.models import User
from app.accounts.schemas import StaffIn
from app.settings import Settings
from tests.conftest import Session, read_code, refused, running

WAIT = 10.0  # seconds a second instance may take to hear a revocation before the test fails


async def me_status(client: AsyncTestClient[Any], token: str) -> tuple[int, str | None]:
    answer = await client.get("/api/v1/me", headers={"Authorization": f"Bearer {token}"})
    return answer.status_code, answer.json().get("extra", {}).get("reason")


@pytest.fixture(scope="module")
async def other_instance(test_settings: Settings) -> AsyncIterator[AsyncTestClient[Any]]:
    """A second app on the same database (and Redis, in the real profile): what a second server hears."""
    async with running(test_settings) as client:
        yield client


async def second_login(accounts_for: Any, who: Session) -> Session:
    """Another login of the same person (say, on the web): its own refresh family."""
    async with accounts_for() as accounts:
        user = await accounts.session.get(User, who.id)
        assert user is not None
        login = await accounts._start_session(user, family_id=uuid4())
    return Session(id=who.id, phone=who.phone, access=login.access_token, refresh=login.refresh_token)


async def heard(instance: AsyncTestClient[Any], token: str) -> None:
    """Wait until the other instance has heard the revocation that ends this token (each revocation it learns
    of wakes the check; one heard late from an earlier test only makes it look again)."""
    revocations = instance.app.state.tokens.revocations
    async with asyncio.timeout(WAIT):
        while True:
            hearing = asyncio.ensure_future(revocations.changed())  # taken before looking: none is missed
            if await me_status(instance, token) == (401, "token_revoked"):
                hearing.cancel()
                return
            await hearing


async def test_logout_ends_that_login_at_once_here_and_on_every_instance(
    client: AsyncTestClient[Any], other_instance: AsyncTestClient[Any], patient: Session, accounts_for: Any
) -> None:
    web = await second_login(accounts_for, patient)
    assert await me_status(other_instance, patient.access) == (200, None)  # verified there: now in its cache
    out = await client.post("/api/v1/auth/logout", headers=patient.headers, json={"refresh_token": patient.refresh})
    assert out.status_code == 204
    await heard(other_instance, patient.access)
    assert await me_status(client, patient.access) == (401, "token_revoked")
    assert await me_status(other_instance, patient.access) == (401, "token_revoked")
    # only that login ended: the other one goes on
    assert await me_status(client, web.access) == (200, None)
    assert await me_status(other_instance, web.access) == (200, None)


async def test_logout_everywhere_ends_every_login(
    client: AsyncTestClient[Any], other_instance: AsyncTestClient[Any], patient: Session, accounts_for: Any
) -> None:
    web = await second_login(accounts_for, patient)
    assert (await client.post("/api/v1/auth/logout", headers=web.headers)).status_code == 204
    await heard(other_instance, web.access)
    for instance in (client, other_instance):
        for token in (patient.access, web.access):
            assert await me_status(instance, token) == (401, "token_revoked")


async def test_refresh_reuse_ends_the_access_tokens_of_that_login(
    client: AsyncTestClient[Any], other_instance: AsyncTestClient[Any], patient: Session
) -> None:
    fresh = (await client.post("/api/v1/auth/refresh", json={"refresh_token": patient.refresh})).json()
    assert await me_status(other_instance, fresh["access_token"]) == (200, None)
    replay = await client.post("/api/v1/auth/refresh", json={"refresh_token": patient.refresh})
    refused(replay, 401, "refresh_reused")
    await heard(other_instance, fresh["access_token"])
    for instance in (client, other_instance):  # the thief's and the owner's access tokens of that login alike
        for token in (patient.access, fresh["access_token"]):
            assert await me_status(instance, token) == (401, "token_revoked")


async def test_a_restarted_instance_knows_the_recent_revocations(
    client: AsyncTestClient[Any], test_settings: Settings, patient: Session
) -> None:
    await client.post("/api/v1/auth/logout", headers=patient.headers, json={"refresh_token": patient.refresh})
    async with running(test_settings) as restarted:
        assert await me_status(restarted, patient.access) == (401, "token_revoked")


async def sign_in(client: AsyncTestClient[Any], settings: Settings, phone: str) -> Any:
    assert (await client.post("/api/v1/auth/otp", json={"phone": phone})).status_code == 202
    return await client.post("/api/v1/auth/token", json={"phone": phone, "code": read_code(settings, phone)})


def session_of(answer: Any, phone: str) -> Session:
    assert answer.status_code == 200, answer.text
    body = answer.json()
    return Session(id=body["user"]["id"], phone=phone, access=body["access_token"], refresh=body["refresh_token"])


async def test_a_deactivated_account_loses_its_tokens_and_cannot_sign_in(
    test_settings: Settings, other_instance: AsyncTestClient[Any], accounts_for: Any,
    new_phone: Callable[[], str],
) -> None:
    quick = msgspec.structs.replace(test_settings, otp_resend_seconds=0)  # signing in twice in a row
    admin_phone, member_phone = new_phone(), new_phone()
    async with accounts_for() as accounts:
        await accounts.ensure_admin(admin_phone, "Test Admin")
        await accounts.create_staff(StaffIn(phone=member_phone, full_name="Test Registrar", role=Role.REGISTRAR))
    async with running(quick) as client:
        admin = session_of(await sign_in(client, quick, admin_phone), admin_phone)
        member = session_of(await sign_in(client, quick, member_phone), member_phone)
        assert await me_status(other_instance, member.access) == (200, None)
        answer = await client.patch(f"/api/v1/staff/{member.id}", headers=admin.headers, json={"active": False})
        assert answer.status_code == 200, answer.text
        await heard(other_instance, member.access)
        assert answer.json()["active"] is False
        for instance in (client, other_instance):
            assert await me_status(instance, member.access) == (401, "token_revoked")
        refused(await client.post("/api/v1/auth/refresh", json={"refresh_token": member.refresh}), 403,
                "account_inactive")
        refused(await sign_in(client, quick, member_phone), 403, "account_inactive")
        # an admin brings the account back: it signs in again
        back = await client.patch(f"/api/v1/staff/{member.id}", headers=admin.headers, json={"active": True})
        assert back.json()["active"] is True
        session_of(await sign_in(client, quick, member_phone), member_phone)


async def test_a_role_change_ends_the_old_roles_and_new_tokens_carry_the_new_ones(
    client: AsyncTestClient[Any], other_instance: AsyncTestClient[Any], admin: Session,
    staff: Callable[..., Any],
) -> None:
    doctor: Session = await staff("doctor", ["endocrinology"])
    assert await me_status(other_instance, doctor.access) == (200, None)
    answer = await client.patch(f"/api/v1/staff/{doctor.id}", headers=admin.headers,
                                json={"roles": ["doctor", "methodist"], "specialties": ["endocrinology", "urology"]})
    assert answer.status_code == 200, answer.text
    await heard(other_instance, doctor.access)
    assert answer.json()["roles"] == ["doctor", "methodist"]
    for instance in (client, other_instance):
        assert await me_status(instance, doctor.access) == (401, "token_revoked")
    fresh = await client.post("/api/v1/auth/refresh", json={"refresh_token": doctor.refresh})
    assert fresh.status_code == 200, fresh.text
    token = fresh.json()["access_token"]
    assert sorted(jwt.decode(token, options={"verify_signature": False})["roles"]) == ["doctor", "methodist"]
    assert await me_status(client, token) == (200, None)
    assert await me_status(other_instance, token) == (200, None)


async def test_staff_changes_are_checked(
    client: AsyncTestClient[Any], admin: Session, staff: Callable[..., Any], patient: Session,
) -> None:
    doctor: Session = await staff("doctor", ["endocrinology"])
    registrar: Session = await staff("registrar")
    path = f"/api/v1/staff/{doctor.id}"
    refused(await client.patch(path, headers=registrar.headers, json={"active": False}), 403)
    refused(await client.patch(path, headers=admin.headers, json={"specialties": ["massage"]}), 422,
            "specialty_mismatch")
    refused(await client.patch(path, headers=admin.headers, json={"roles": ["registrar"]}), 422,
            "specialty_mismatch")  # a registrar holds no specialties: drop them with the role
    refused(await client.patch(path, headers=admin.headers, json={"roles": ["psychologist"]}), 422,
            "specialty_mismatch")
    refused(await client.patch(path, headers=admin.headers, json={"roles": ["patient"]}), 422, "role_invalid")
    refused(await client.patch(path, headers=admin.headers, json={"roles": []}), 422)
    refused(await client.patch(f"/api/v1/staff/{patient.id}", headers=admin.headers, json={"active": False}),
            404, "staff_not_found")
    # the admin making the change cannot lock themself out
    refused(await client.patch(f"/api/v1/staff/{admin.id}", headers=admin.headers, json={"active": False}),
            409, "self_lockout")
    refused(await client.patch(f"/api/v1/staff/{admin.id}", headers=admin.headers, json={"roles": ["registrar"]}),
            409, "self_lockout")
    ok = await client.patch(path, headers=admin.headers, json={"roles": ["registrar"], "specialties": []})
    assert ok.status_code == 200, ok.text
    assert (ok.json()["roles"], ok.json()["specialties"]) == (["registrar"], [])
    # unchanged access revokes nothing
    assert await me_status(client, registrar.access) == (200, None)
    same = await client.patch(f"/api/v1/staff/{registrar.id}", headers=admin.headers, json={"active": True})
    assert same.status_code == 200
    assert await me_status(client, registrar.access) == (200, None)
