"""Heartbeats renewed together (RedisPresence): many sockets touching at once share one pipeline, and each
touch still lands as it was asked, the latest of a socket's touches winning. An instance answers for its own
sockets without asking Redis, and asks Redis about everyone else's."""

from __future__ import annotations

import asyncio
import uuid

import pytest
from redis.asyncio import Redis

from app.chat.hub import RedisPresence
from app.settings import Settings
from tests.conftest import PROFILE

pytestmark = pytest.mark.skipif(PROFILE != "real", reason="Redis runs in the real profile only")


class CountingPipelines(Redis):
    """A Redis client that counts the pipelines it runs and the scripts it has run (a script's first call may
    be refused until the script is loaded: only the call that answers counts)."""

    executed = 0

    def pipeline(self, transaction: bool = True, shard_hint: str | None = None):  # type: ignore[no-untyped-def]
        pipe = super().pipeline(transaction, shard_hint)
        run = pipe.execute

        async def execute(raise_on_error: bool = True) -> list[object]:
            CountingPipelines.executed += 1
            return await run(raise_on_error)

        pipe.execute = execute  # type: ignore[method-assign]
        return pipe

    async def evalsha(self, *args: object, **kwargs: object) -> object:  # type: ignore[override]
        answer = await super().evalsha(*args, **kwargs)  # type: ignore[arg-type]
        CountingPipelines.executed += 1
        return answer


async def test_touches_at_once_share_a_pipeline_and_each_lands(test_settings: Settings) -> None:
    assert test_settings.redis_url
    redis = CountingPipelines.from_url(test_settings.redis_url)
    presence = RedisPresence(redis, ttl=60)
    users = [uuid.uuid4() for _ in range(200)]
    try:
        CountingPipelines.executed = 0
        await asyncio.gather(*(presence.touch(u, f"socket-{u}") for u in users))
        assert CountingPipelines.executed < 10  # a round trip each would be 200
        assert await presence.online(users) == set(users)
        assert await presence.foreground(users) == set(users)

        first = users[0]
        await asyncio.gather(presence.touch(first, f"socket-{first}", True),
                             presence.touch(first, f"socket-{first}", False))  # the later one wins
        assert await presence.foreground([first]) == set()
        assert await presence.online([first]) == {first}
    finally:
        for u in users:
            await presence.leave(u, f"socket-{u}")
        await redis.aclose()


async def test_a_failed_batch_fails_each_of_its_touches(test_settings: Settings) -> None:
    redis = Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.5)  # nothing listens there
    presence = RedisPresence(redis, ttl=60)
    try:
        outcomes = await asyncio.gather(*(presence.touch(uuid.uuid4(), "s") for _ in range(3)),
                                        return_exceptions=True)
        assert all(isinstance(o, Exception) for o in outcomes)
    finally:
        await redis.aclose()


async def test_an_instance_answers_for_its_own_sockets_and_asks_redis_for_the_others(test_settings: Settings) -> None:
    assert test_settings.redis_url
    redis = CountingPipelines.from_url(test_settings.redis_url)
    here, elsewhere = RedisPresence(redis, ttl=60), RedisPresence(redis, ttl=60)  # two instances' presences
    mine, theirs, away = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    try:
        await here.touch(mine, "socket-here")
        await elsewhere.touch(theirs, "socket-elsewhere")
        CountingPipelines.executed = 0
        assert await here.foreground([mine]) == {mine}
        assert CountingPipelines.executed == 0  # its own socket: no round trip
        assert await here.foreground([mine, theirs, away]) == {mine, theirs}
        assert await here.online([mine, theirs, away]) == {mine, theirs}
        assert CountingPipelines.executed == 2  # one each for those not connected here
        await here.touch(mine, "socket-here", foreground=False)  # the app went to the background
        assert await here.foreground([mine]) == set()
        assert await elsewhere.foreground([mine]) == set()
        await here.leave(mine, "socket-here")
        assert await here.online([mine]) == set()
    finally:
        await here.leave(mine, "socket-here")
        await elsewhere.leave(theirs, "socket-elsewhere")
        await redis.aclose()
