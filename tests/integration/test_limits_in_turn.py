"""Several limits in one step (a code request's three): in order, stopping at the first refused, and a
checking step counts nothing. On the real profile against Redis, as in production."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator

import pytest
from redis.asyncio import Redis

from app.limits import InProcessLimiter, RateLimiter, RedisLimiter, Step
from app.settings import Settings


@pytest.fixture
async def limiter(test_settings: Settings) -> AsyncIterator[RateLimiter]:
    if not test_settings.redis_url:
        yield InProcessLimiter()
        return
    redis = Redis.from_url(test_settings.redis_url)
    try:
        yield RedisLimiter(redis)
    finally:
        await redis.aclose()


async def test_steps_go_in_order_and_stop_at_the_first_refused(limiter: RateLimiter) -> None:
    ip, fail, phone = (f"test:{secrets.token_hex(6)}:{name}" for name in ("ip", "fail", "phone"))
    steps = [Step(ip, 3, 60), Step(fail, 2, 60, counts=False), Step(phone, 1, 60)]
    assert await limiter.hit_in_turn(steps) == (-1, 0)
    refused, wait = await limiter.hit_in_turn(steps)  # the phone's one event is spent
    assert refused == 2
    assert 1 <= wait <= 60
    assert await limiter.peek(ip) == (2, (await limiter.peek(ip))[1])  # counted both times
    assert (await limiter.peek(fail))[0] == 0  # a checking step counts nothing

    await limiter.hit(fail, 10, 60)
    await limiter.hit(fail, 10, 60)  # the checked key now holds its limit
    refused, _ = await limiter.hit_in_turn(steps)
    assert refused == 1
    assert (await limiter.peek(phone))[0] == 2  # not counted again: the step before refused
    assert (await limiter.peek(ip))[0] == 3

    refused, _ = await limiter.hit_in_turn(steps)  # the fourth event of a limit of three
    assert refused == 0
    assert (await limiter.peek(ip))[0] == 4
