"""Fixed-window rate limits: shared through Redis across instances, or in-process in the embedded profile."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Protocol

from redis.asyncio import Redis


class RateLimiter(Protocol):
    async def hit(self, key: str, limit: int, window_seconds: int) -> int:
        """Count one event; 0 when allowed, else the seconds until the window frees."""

    async def hit_many(self, keys: list[str], limit: int, window_seconds: int) -> list[int]:
        """Count one event per key (a key may repeat), in order; hit's answer for each."""

    async def peek(self, key: str) -> tuple[int, int]:
        """Without counting: the events in the key's current window and the seconds it has left ((0, 0): none)."""

    async def hit_in_turn(self, steps: list[Step]) -> tuple[int, int]:
        """Several limits in one step, in order, stopping at the first refused: (its index, the seconds until
        its window frees), or (-1, 0) when all allowed. A step that counts is `hit`; one that does not is
        refused when its key already holds `limit` events (one more would be too many) and counts nothing."""

    async def give_back(self, key: str) -> None:
        """Uncount one event hit counted (an attempt counted up front that turned out not to spend the budget)."""


@dataclass(frozen=True, slots=True)
class Step:
    key: str
    limit: int
    window_seconds: int
    counts: bool = True


class InProcessLimiter:
    def __init__(self) -> None:
        self._windows: dict[str, tuple[float, int]] = {}

    async def hit(self, key: str, limit: int, window_seconds: int) -> int:
        return (await self.hit_many([key], limit, window_seconds))[0]

    async def hit_many(self, keys: list[str], limit: int, window_seconds: int) -> list[int]:
        now = time.monotonic()
        if len(self._windows) > 100_000:  # forget finished windows so memory stays bounded
            self._windows = {k: v for k, v in self._windows.items() if v[0] > now}
        waits = []
        for key in keys:
            ends, count = self._windows.get(key, (0.0, 0))
            if ends <= now:
                ends, count = now + window_seconds, 0
            count += 1
            self._windows[key] = (ends, count)
            waits.append(0 if count <= limit else max(1, math.ceil(ends - now)))
        return waits

    async def peek(self, key: str) -> tuple[int, int]:
        ends, count = self._windows.get(key, (0.0, 0))
        left = ends - time.monotonic()
        return (count, max(1, math.ceil(left))) if left > 0 else (0, 0)

    async def hit_in_turn(self, steps: list[Step]) -> tuple[int, int]:
        for i, step in enumerate(steps):
            if step.counts:
                wait = await self.hit(step.key, step.limit, step.window_seconds)
            else:
                count, left = await self.peek(step.key)
                wait = left if count >= step.limit else 0
            if wait:
                return i, wait
        return -1, 0

    async def give_back(self, key: str) -> None:
        ends, count = self._windows.get(key, (0.0, 0))
        if ends > time.monotonic() and count > 0:
            self._windows[key] = (ends, count - 1)


# Each key: count, start its window on the first count, answer 0 or the seconds left. One round trip for
# any number of keys, and atomic: no window is left without its expiry.
HIT_SCRIPT = """
local waits = {}
for i, key in ipairs(KEYS) do
  local count = redis.call('INCR', key)
  local ttl = redis.call('TTL', key)
  if ttl < 0 then
    redis.call('EXPIRE', key, ARGV[2])
    ttl = tonumber(ARGV[2])
  end
  if count > tonumber(ARGV[1]) then waits[i] = math.max(ttl, 1) else waits[i] = 0 end
end
return waits
"""


# a window that has ended stays ended: never recreate the key (it would have no expiry)
GIVE_BACK_SCRIPT = """
if redis.call('EXISTS', KEYS[1]) == 1 and tonumber(redis.call('GET', KEYS[1])) > 0 then
  redis.call('DECR', KEYS[1])
end
return 0
"""


# Steps in order (ARGV: limit, window, counts per key), stopping at the first refused: {index from 1, wait}
# or {0, 0}. A counting step is HIT_SCRIPT's; a checking one is refused when its key holds `limit` events.
HIT_IN_TURN_SCRIPT = """
for i, key in ipairs(KEYS) do
  local limit = tonumber(ARGV[3 * i - 2])
  if ARGV[3 * i] == '1' then
    local count = redis.call('INCR', key)
    local ttl = redis.call('TTL', key)
    if ttl < 0 then
      redis.call('EXPIRE', key, ARGV[3 * i - 1])
      ttl = tonumber(ARGV[3 * i - 1])
    end
    if count > limit then return {i, math.max(ttl, 1)} end
  else
    local count = tonumber(redis.call('GET', key) or '0')
    if count >= limit then return {i, math.max(redis.call('TTL', key), 1)} end
  end
end
return {0, 0}
"""


class RedisLimiter:
    def __init__(self, redis: Redis) -> None:
        self.redis = redis
        self._script = redis.register_script(HIT_SCRIPT)
        self._give_back = redis.register_script(GIVE_BACK_SCRIPT)
        self._in_turn = redis.register_script(HIT_IN_TURN_SCRIPT)

    async def hit(self, key: str, limit: int, window_seconds: int) -> int:
        return (await self.hit_many([key], limit, window_seconds))[0]

    async def hit_many(self, keys: list[str], limit: int, window_seconds: int) -> list[int]:
        if not keys:
            return []
        waits = await self._script(keys=[f"limit:{k}" for k in keys], args=[limit, window_seconds])
        return [int(w) for w in waits]

    async def peek(self, key: str) -> tuple[int, int]:
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.get(f"limit:{key}")
            pipe.ttl(f"limit:{key}")
            count, ttl = await pipe.execute()
        return (int(count), max(1, int(ttl))) if count is not None and ttl != -2 else (0, 0)

    async def give_back(self, key: str) -> None:
        await self._give_back(keys=[f"limit:{key}"])

    async def hit_in_turn(self, steps: list[Step]) -> tuple[int, int]:
        if not steps:
            return -1, 0
        index, wait = await self._in_turn(keys=[f"limit:{s.key}" for s in steps],
                                          args=[a for s in steps for a in (s.limit, s.window_seconds, int(s.counts))])
        return int(index) - 1, int(wait) if int(index) else 0
