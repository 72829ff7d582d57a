"""Phone login by one-time code: formats, expiry, tries, resend limits, per-address limits."""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Callable
from typing import Any

import msgspec
import pytest
from litestar.testing import AsyncTestClient
from redis.asyncio import Redis
from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.accounts.models import OtpCode, User
from app.accounts.service import AccountService
from app.accounts.tokens import TokenIssuer
from app.errors import DomainError
from app.limits import InProcessLimiter, RateLimiter, RedisLimiter
from app.notifications.sms import LogSms
from app.settings import Settings
from tests.conftest import read_code, running


async def test_code_from_the_sms_log_signs_a_new_phone_in_as_a_patient(
    client: AsyncTestClient[Any], test_settings: Settings, new_phone: Callable[[], str]
) -> None:
    phone = new_phone()
    sent = await client.post("/api/v1/auth/otp", json={"phone": phone})
    assert sent.status_code == 202
    assert sent.json() == {"expires_in": 300}
    code = read_code(test_settings, phone)
    assert len(code) == 6
    assert code.isdigit()
    answer = await client.post("/api/v1/auth/token", json={"phone": phone, "code": code})
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["token_type"] == "Bearer"
    assert body["expires_in"] == 900
    assert body["user"]["phone"] == phone
    assert body["user"]["roles"] == ["patient"]
    me = await client.get("/api/v1/me", headers={"Authorization": f"Bearer {body['access_token']}"})
    assert me.json()["phone"] == phone
    # the code is spent: a second use fails
    again = await client.post("/api/v1/auth/token", json={"phone": phone, "code": code})
    assert again.status_code == 401


async def test_only_a_hash_of_the_code_is_stored(
    client: AsyncTestClient[Any], test_settings: Settings, new_phone: Callable[[], str],
    session_maker: async_sessionmaker[AsyncSession],
) -> None:
    phone = new_phone()
    await client.post("/api/v1/auth/otp", json={"phone": phone})
    code = read_code(test_settings, phone)
    async with session_maker() as session:
        row = await session.scalar(select(OtpCode).where(OtpCode.phone == phone))
    assert row is not None
    assert code not in row.code_hash
    assert len(row.code_hash) == 64


@pytest.mark.parametrize("written", ["+7 (916) 123-45-67", "8 916 123 45 67", "89161234567", "+79161234567",
                                     "9161234567", "+7.916.123.45.67"])
async def test_common_ways_of_writing_a_phone_are_one_number(
    client: AsyncTestClient[Any], test_settings: Settings, written: str
) -> None:
    answer = await client.post("/api/v1/auth/otp", json={"phone": written})
    # the same number each time: the first call sends, the rest are "too soon" for that same E.164 phone
    assert answer.status_code in (202, 429)
    if answer.status_code == 429:
        assert answer.json()["extra"]["reason"] == "otp_resend_too_soon"
    assert read_code(test_settings, "+79161234567")


@pytest.mark.parametrize("garbage", ["garbage", "123", "+7 916 CALL-ME", "8 916 123 45 6", "+999 123 456 789",
                                     "", " ", "+7 (916) 123-45-67-89-01-23", "<script>", "+7\u0000916"])
async def test_impossible_phones_are_refused(client: AsyncTestClient[Any], garbage: str) -> None:
    answer = await client.post("/api/v1/auth/otp", json={"phone": garbage})
    assert answer.status_code == 422, answer.text
    assert answer.json()["extra"]["reason"] in ("phone_invalid", "invalid_input")


async def test_resend_within_a_minute_is_429_with_retry_after(
    client: AsyncTestClient[Any], new_phone: Callable[[], str]
) -> None:
    phone = new_phone()
    assert (await client.post("/api/v1/auth/otp", json={"phone": phone})).status_code == 202
    again = await client.post("/api/v1/auth/otp", json={"phone": phone})
    assert again.status_code == 429
    assert 1 <= int(again.headers["retry-after"]) <= 60
    assert again.json()["extra"]["reason"] == "otp_resend_too_soon"


async def test_five_wrong_codes_burn_it(
    client: AsyncTestClient[Any], test_settings: Settings, new_phone: Callable[[], str]
) -> None:
    phone = new_phone()
    await client.post("/api/v1/auth/otp", json={"phone": phone})
    code = read_code(test_settings, phone)
    wrong = f"{(int(code) + 1) % 1_000_000:06d}"
    lefts = []
    for _ in range(5):
        answer = await client.post("/api/v1/auth/token", json={"phone": phone, "code": wrong})
        assert answer.status_code == 401
        assert answer.json()["extra"]["reason"] == "otp_invalid"
        lefts.append(answer.json()["extra"]["attempts_left"])
    assert lefts == [4, 3, 2, 1, 0]
    burned = await client.post("/api/v1/auth/token", json={"phone": phone, "code": code})
    assert burned.status_code == 401
    assert burned.json()["extra"]["reason"] == "otp_attempts_exhausted"  # says why, not "no code"
    assert "request a new code" in burned.json()["detail"]


async def test_wrong_codes_lock_the_phone_across_fresh_codes(
    test_settings: Settings, new_phone: Callable[[], str]
) -> None:
    """Five tries per code, ten per phone and hour: a fresh code brings no fresh guesses."""
    quick = msgspec.structs.replace(test_settings, otp_resend_seconds=0)  # a new code whenever asked
    phone = new_phone()
    async with running(quick) as client:
        async def guess(code: str) -> Any:
            return await client.post("/api/v1/auth/token", json={"phone": phone, "code": code})

        answers = []
        for _ in range(2):
            assert (await client.post("/api/v1/auth/otp", json={"phone": phone})).status_code == 202
            code = read_code(quick, phone)
            wrong = f"{(int(code) + 1) % 1_000_000:06d}"
            answers += [await guess(wrong) for _ in range(5)]
        assert [a.status_code for a in answers] == [401] * 9 + [429]
        assert answers[-1].json()["extra"]["reason"] == "otp_locked"
        right, wrong_again = await guess(code), await guess(wrong)  # the right code of a live code, and not
        new_code = await client.post("/api/v1/auth/otp", json={"phone": phone})
    for locked in (right, wrong_again, new_code):
        assert locked.status_code == 429, locked.text
        assert locked.json()["extra"]["reason"] == "otp_locked"
        assert 3500 <= int(locked.headers["retry-after"]) <= 3600
    # the lock answers a right and a wrong guess alike: it never tells the guesser he has hit it
    assert {k: v for k, v in right.json().items() if k != "extra"} == \
        {k: v for k, v in wrong_again.json().items() if k != "extra"}
    assert set(right.json()["extra"]) == set(wrong_again.json()["extra"]) == {"reason", "retry_after"}


async def test_parallel_guesses_at_the_last_try_of_the_hour_get_one_guess_between_them(
    test_settings: Settings, new_phone: Callable[[], str], session_maker: async_sessionmaker[AsyncSession]
) -> None:
    """Each guess is counted before it is compared: a burst at the ninth failure cannot all slip under the lock.
    The services are called directly: the test client serialises requests, and this needs them in parallel
    (on the real profile the limiter is Redis, as in production)."""
    quick = msgspec.structs.replace(test_settings, otp_resend_seconds=0)
    redis = Redis.from_url(quick.redis_url) if quick.redis_url else None
    limiter: RateLimiter = RedisLimiter(redis) if redis is not None else InProcessLimiter()
    issuer, sms, phone = TokenIssuer(quick), LogSms(quick.resolved_sms_log_path), new_phone()

    async def attempt(code: str | None = None) -> str:
        async with session_maker() as session:
            accounts = AccountService(session, quick, issuer, limiter, sms)
            try:
                if code is None:
                    await accounts.request_code(phone, "192.0.2.1")
                else:
                    await accounts.login(phone, code)
                await session.commit()
            except DomainError as refusal:
                return str(refusal.extra["reason"])
            return "ok"

    try:
        for tries in (5, 4):  # nine failures: one guess of the hour is left
            assert await attempt() == "ok"
            wrong = f"{(int(read_code(quick, phone)) + 1) % 1_000_000:06d}"
            assert [await attempt(wrong) for _ in range(tries)] == ["otp_invalid"] * tries
        assert await attempt() == "ok"
        code = read_code(quick, phone)
        burst = await asyncio.gather(*(attempt(f"{(int(code) + k) % 1_000_000:06d}") for k in (1, 2, 3, 4)))
        assert burst == ["otp_locked"] * 4
        async with session_maker() as session:  # exactly one of them was compared with the code
            assert await session.scalar(select(OtpCode.attempts).where(OtpCode.phone == phone)) == 1
        assert await attempt(code) == "otp_locked"  # the right code too, now
    finally:
        if redis is not None:
            await redis.aclose()


async def test_right_codes_do_not_spend_the_phone_s_guesses(
    test_settings: Settings, new_phone: Callable[[], str]
) -> None:
    quick = msgspec.structs.replace(test_settings, otp_resend_seconds=0)
    phone = new_phone()
    async with running(quick) as client:
        for _ in range(12):  # more sign-ins than the hour's budget of wrong guesses
            assert (await client.post("/api/v1/auth/otp", json={"phone": phone})).status_code == 202
            answer = await client.post("/api/v1/auth/token", json={"phone": phone, "code": read_code(quick, phone)})
            assert answer.status_code == 200, answer.text


async def test_expired_code_is_refused(
    client: AsyncTestClient[Any], test_settings: Settings, new_phone: Callable[[], str],
    session_maker: async_sessionmaker[AsyncSession],
) -> None:
    phone = new_phone()
    await client.post("/api/v1/auth/otp", json={"phone": phone})
    code = read_code(test_settings, phone)
    async with session_maker() as session:  # five minutes pass
        await session.execute(update(OtpCode).where(OtpCode.phone == phone)
                              .values(expires_at=dt.datetime.now(dt.UTC) - dt.timedelta(seconds=1)))
        await session.commit()
    answer = await client.post("/api/v1/auth/token", json={"phone": phone, "code": code})
    assert answer.status_code == 401
    assert answer.json()["extra"]["reason"] == "otp_expired"


async def test_malformed_code_is_422_and_costs_no_try(
    client: AsyncTestClient[Any], test_settings: Settings, new_phone: Callable[[], str]
) -> None:
    phone = new_phone()
    await client.post("/api/v1/auth/otp", json={"phone": phone})
    for bad in ("12345", "1234567", "abcdef", "١٢٣٤٥٦"):
        answer = await client.post("/api/v1/auth/token", json={"phone": phone, "code": bad})
        assert answer.status_code == 422
    ok = await client.post("/api/v1/auth/token", json={"phone": phone, "code": read_code(test_settings, phone)})
    assert ok.status_code == 200


async def test_per_address_limit(test_settings: Settings, new_phone: Callable[[], str]) -> None:
    strict = msgspec.structs.replace(test_settings, otp_per_ip_per_hour=3)
    if strict.redis_url:  # the count lives in Redis, shared with earlier tests from the same test address
        redis = Redis.from_url(strict.redis_url)
        await redis.delete("limit:otp:ip:testclient")
        await redis.aclose()
    async with running(strict) as client:
        statuses = [(await client.post("/api/v1/auth/otp", json={"phone": new_phone()})).status_code
                    for _ in range(5)]
        refused = await client.post("/api/v1/auth/otp", json={"phone": new_phone()})
    assert statuses == [202, 202, 202, 429, 429]
    assert refused.json()["extra"]["reason"] == "rate_limited"
    assert 3500 <= int(refused.headers["retry-after"]) <= 3600


async def test_existing_phone_signs_into_its_own_account(
    accounts_for: Any, login: Callable[[str], Any], new_phone: Callable[[], str],
    session_maker: async_sessionmaker[AsyncSession],
) -> None:
    phone = new_phone()
    async with accounts_for() as accounts:
        existing = await accounts.ensure_admin(phone, "Existing Person")
    session = await login(phone)
    assert session.id == existing.id
    async with session_maker() as db:
        assert len((await db.scalars(select(User).where(User.phone == phone))).all()) == 1
