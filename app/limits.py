"""Fixed-window rate limits: shared through Redis across instances, or in-process in the embedded profile."""

from __future__ import annotations

import math
import time
from typing import Protocol

from redis.asyncio import Redis


class RateLimiter(Protocol):
    async def hit(self, key: str, limit: int, window_seconds: int) -> int:
        """Count one event; 0 when allowed, else the seconds until the window frees."""


class InProcessLimiter:
    def __init__(self) -> None:
        self._windows: dict[str, tuple[float, int]] = {}

    async def hit(self, key: str, limit: int, window_seconds: int) -> int:
        now = time.monotonic()
        if len(self._windows) > 100_000:  # forget finished windows so memory stays bounded
            self._windows = {k: v for k, v in self._windows.items() if v[0] > now}
        ends, count = self._windows.get(key, (0.0, 0))
        if ends <= now:
            ends, count = now + window_seconds, 0
        count += 1
        self._windows[key] = (ends, count)
        return 0 if count <= limit else max(1, math.ceil(ends - now))


class RedisLimiter:
    def __init__(self, redis: Redis) -> None:
        self._redis = redis

    async def hit(self, key: str, limit: int, window_seconds: int) -> int:
        name = f"limit:{key}"
        async with self._redis.pipeline(transaction=True) as pipe:  # one round trip
            pipe.incr(name)
            pipe.expire(name, window_seconds, nx=True)
            pipe.ttl(name)
            count, _, ttl = await pipe.execute()
        return 0 if int(count) <= limit else max(1, int(ttl))
