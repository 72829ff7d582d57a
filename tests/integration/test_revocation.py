"""Signing out, a reused refresh token, deactivation and a role change end access at once, on every instance."""

from __future__ import annotations

import asyncio
import datetime as dt
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any
from uuid import UUID, uuid4

import jwt
import msgspec
import pytest
from litestar.testing import AsyncTestClient
from sqlalchemy import func, select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.access import Role, Viewer
from app.accounts.models import AccessRevocation, RefreshToken, User
from app.accounts.schemas import StaffIn
from app.accounts.service import AccountService, Login
from app.accounts.tokens import TokenIssuer
from app.db import Database
from app.errors import DomainError, NotAuthenticated
from app.limits import InProcessLimiter
from app.notifications.sms import LogSms
from app.revocation import Revocations
from app.settings import Settings
from tests.conftest import Session, read_code, refused, running

WAIT = 10.0  # seconds a second instance may take to hear a revocation before the test fails


async def me_status(client: AsyncTestClient[Any], token: str) -> tuple[int, str | None]:
    answer = await client.get("/api/v1/me", headers={"Authorization": f"Bearer {token}"})
    return answer.status_code, answer.json().get("extra", {}).get("reason")


@pytest.fixture(scope="module")
async def other_instance(test_settings: Settings) -> AsyncIterator[AsyncTestClient[Any]]:
    """A second app on the same database: what a second server hears. In the real profile it hears through
    Redis; in the embedded one (no broker, each app its own memory) only by reloading the database, so the
    "every instance" checks below test that path there."""
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
    revocations, here = instance.app.state.tokens.revocations, asyncio.get_running_loop()
    async with asyncio.timeout(WAIT):
        while True:
            woken = asyncio.Event()
            # the app runs on the test client's portal (its own thread and loop): it wakes this loop thread-safely
            revocations.on_revocation(lambda _, woken=woken: here.call_soon_threadsafe(woken.set))
            if await me_status(instance, token) == (401, "token_revoked"):  # looked after listening: none missed
                return
            await woken.wait()


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


def dead_redis_url() -> str:
    """A Redis address nothing listens on: connections are refused at once."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"redis://127.0.0.1:{port}/0"


async def test_an_instance_without_redis_still_refuses_revoked_tokens(
    client: AsyncTestClient[Any], test_settings: Settings, patient: Session, accounts_for: Any
) -> None:
    """Started while Redis is down: it loads the revocations from the database before serving, and keeps
    reloading them until the subscription is back."""
    web = await second_login(accounts_for, patient)
    out = await client.post("/api/v1/auth/logout", headers=patient.headers, json={"refresh_token": patient.refresh})
    assert out.status_code == 204
    cut_off = msgspec.structs.replace(test_settings, redis_url=dead_redis_url(), redis_timeout_seconds=0.2)
    async with running(cut_off) as alone:
        assert await me_status(alone, patient.access) == (401, "token_revoked")  # revoked before it started
        assert await me_status(alone, web.access) == (200, None)
        assert (await client.post("/api/v1/auth/logout", headers=web.headers)).status_code == 204
        await heard(alone, web.access)  # revoked while it runs: from the database, Redis being away


async def test_revocations_older_than_a_token_s_lifetime_are_deleted(
    test_settings: Settings, patient: Session, session_maker: async_sessionmaker[AsyncSession]
) -> None:
    keep = Revocations(test_settings.access_token_seconds)
    now, user = dt.datetime.now(dt.UTC), UUID(str(patient.id))
    old, recent = uuid4(), uuid4()
    async with session_maker() as session:
        session.add_all([
            AccessRevocation(user_id=user, family_id=old, not_before=now - dt.timedelta(seconds=keep.keep_seconds + 1)),
            AccessRevocation(user_id=user, family_id=recent, not_before=now),
        ])
        await session.commit()
    database = Database(test_settings)
    try:
        for _ in range(2):  # every instance does it: twice is as good as once
            await keep.forget(database)
    finally:
        await database.dispose()
    async with session_maker() as session:
        left = set((await session.scalars(select(AccessRevocation.family_id)
                                          .where(AccessRevocation.family_id.in_([old, recent])))).all())
    assert left == {recent}


async def test_refresh_racing_logout_everywhere_leaves_no_login_behind(
    test_settings: Settings, patient: Session, accounts_for: Any,
    session_maker: async_sessionmaker[AsyncSession],
) -> None:
    """A refresh in flight while every login ends: its new token is revoked too, its access token refused.
    The services are called directly, each on its own session: the test client serialises requests."""
    issuer, user = TokenIssuer(test_settings), UUID(str(patient.id))

    async def in_session(act: Callable[[AccountService], Awaitable[Any]]) -> Any:
        async with session_maker() as session:
            accounts = AccountService(session, test_settings, issuer, InProcessLimiter(),
                                      LogSms(test_settings.resolved_sms_log_path))
            try:
                done = await act(accounts)
                await session.commit()
                return done
            except DomainError as refusal:
                return refusal.extra["reason"]

    for _ in range(20):
        web = await second_login(accounts_for, patient)
        fresh, _ = await asyncio.gather(
            in_session(lambda accounts, token=web.refresh: accounts.refresh(token)),
            in_session(lambda accounts: accounts.logout(Viewer(id=user), None)))
        async with session_maker() as session:
            alive = await session.scalar(select(func.count()).select_from(RefreshToken).where(
                RefreshToken.user_id == user, RefreshToken.used_at.is_(None), RefreshToken.revoked_at.is_(None)))
        assert alive == 0
        if isinstance(fresh, Login):  # the refresh went first: the logout ended what it issued
            with pytest.raises(NotAuthenticated, match="revoked"):
                issuer.viewer_from(fresh.access_token)
        else:  # the logout went first: the spent family's token comes back as a reuse
            assert fresh in ("refresh_reused", "refresh_invalid")


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


async def test_deactivating_never_fails_on_specialties_the_account_already_has(
    client: AsyncTestClient[Any], admin: Session, staff: Callable[..., Any],
    session_maker: async_sessionmaker[AsyncSession],
) -> None:
    """Specialties that no longer fit the role (set before a rule changed) are checked when they change only."""
    doctor: Session = await staff("doctor", ["endocrinology"])
    async with session_maker() as session:
        await session.execute(update(User).where(User.id == UUID(str(doctor.id))).values(specialties=["massage"]))
        await session.commit()
    path = f"/api/v1/staff/{doctor.id}"
    off = await client.patch(path, headers=admin.headers, json={"active": False})
    assert off.status_code == 200, off.text
    assert await me_status(client, doctor.access) == (401, "token_revoked")
    assert (await client.patch(path, headers=admin.headers, json={"active": True})).status_code == 200
    refused(await client.patch(path, headers=admin.headers, json={"specialties": ["massage"]}), 422,
            "specialty_mismatch")


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
