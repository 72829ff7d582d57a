"""The chat send queue on its own: CPU per message of writing groups of sends, with no HTTP or sockets.

    python -m tests.harness python -m bench.chat_writer [--concurrency 1,8,32] [--sends 3000]

It makes a fresh PostgreSQL database with 500 patient-doctor conversations (as bench/chat.py does), then, in
this process, runs the app's SendQueue against it with the real Redis limiter, presence and bus. N tasks send
one message after another (N = the concurrency: how many sends wait at once, so about how big a group gets),
first as a warm-up, then measured: sends per second, this process's CPU per message and per group, and the
mean group size. It does so twice, once as the app writes a group on PostgreSQL (asyncpg itself,
app/chat/store.py PgSendStore) and once through SQLAlchemy (SqlSendStore, the embedded profile's way), so the
two can be compared on the same machine. One JSON line at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import secrets
import sys
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from redis.asyncio import Redis

from app.chat import streams
from app.chat.hub import RedisBus, RedisPresence
from app.chat.sending import SendQueue
from app.chat.service import SendRules, Sent
from app.chat.store import Send, SendStore, SqlSendStore
from app.db import Database
from app.errors import DomainError
from app.limits import RedisLimiter
from app.settings import Settings
from bench.chat import create_people
from bench.common import create_database, drop_database, pg_dsn, run_benchmark


class SqlAlchemyQueue(SendQueue):
    """The same queue writing each group through SQLAlchemy on PostgreSQL too."""

    async def _commit(self, sends: list[Send]) -> tuple[list[Sent | DomainError], streams.Staged]:
        staged = streams.Staged()
        async with sql_store(self.database) as store:
            outcomes = await self.rules.write(store, staged, sends)
        return outcomes, staged


@asynccontextmanager
async def sql_store(database: Database) -> AsyncIterator[SendStore]:
    async with database.writer() as session:
        yield SqlSendStore(session)
        await session.commit()


class CountingBus(RedisBus):
    """Publishes as the app does, and counts them: one publish per group written."""

    def __init__(self, redis: Redis) -> None:
        super().__init__(redis)
        self.published = 0

    async def publish(self, raw: bytes) -> None:
        self.published += 1
        await super().publish(raw)


async def measure(queue: SendQueue, bus: CountingBus, people: Any, concurrency: int, sends: int) -> dict[str, Any]:
    left = 0

    async def sender() -> None:
        nonlocal left
        while left > 0:
            left -= 1
            k = random.randrange(people.pairs)
            author = people.ids[k] if left % 2 else people.ids[people.pairs + k]
            await queue.send(Send(author, people.conversations[k], "hello, how are you today?", uuid.uuid4().hex))

    left = max(200, sends // 5)  # warm-up: connections, prepared statements
    await asyncio.gather(*(sender() for _ in range(concurrency)))
    bus.published = 0
    left = sends
    cpu, wall = time.process_time(), time.perf_counter()
    await asyncio.gather(*(sender() for _ in range(concurrency)))
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    groups = bus.published
    return {"concurrency": concurrency, "sends": sends, "per_s": round(sends / wall),
            "cpu_ms_per_msg": round(cpu * 1000 / sends, 3), "cpu_ms_per_group": round(cpu * 1000 / groups, 2),
            "mean_group": round(sends / groups, 1)}


async def run(args: argparse.Namespace, tmp: Path) -> list[dict[str, Any]]:
    postgres_url = os.environ["TEST_POSTGRES_URL"]
    name, url = await create_database(postgres_url)
    redis = Redis.from_url(os.environ["TEST_REDIS_URL"])
    results = []
    try:
        people = await create_people(pg_dsn(postgres_url, name), 500)
        settings = Settings(database_url=url, redis_url=os.environ["TEST_REDIS_URL"], data_dir=str(tmp),
                            jwt_keys=f"k1={secrets.token_urlsafe(36)}", secret_key=secrets.token_urlsafe(36),
                            chat_sends_per_minute=10**9)
        rules = SendRules(settings, RedisLimiter(redis), RedisPresence(redis, 60))
        for label, kind in (("asyncpg", SendQueue), ("sqlalchemy", SqlAlchemyQueue)):
            database = Database(settings)
            bus = CountingBus(redis)
            queue = kind(database, rules, bus)
            writer = asyncio.create_task(queue.run())
            await asyncio.sleep(0)
            try:
                for concurrency in args.concurrency:
                    result = {"store": label, **await measure(queue, bus, people, concurrency, args.sends)}
                    results.append(result)
                    print(f"{label:>10}  concurrency {concurrency:>3}: {result['per_s']:>6} sends/s, "
                          f"CPU {result['cpu_ms_per_msg']:.3f} ms/message, {result['cpu_ms_per_group']:.2f} ms/group, "
                          f"mean group {result['mean_group']}", flush=True)
            finally:
                writer.cancel()
                await asyncio.gather(writer, return_exceptions=True)
                await database.dispose()
    finally:
        await redis.aclose()
        await drop_database(postgres_url, name)
    return results


def concurrency_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError("expected numbers like 1,8,32") from exc
    if not values or any(not 1 <= v <= 1000 for v in values):
        raise argparse.ArgumentTypeError("each in [1, 1000]")
    return values


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.chat_writer", description=__doc__.split("\n\n")[0])
    p.add_argument("--concurrency", type=concurrency_list, default=[1, 8, 32], help="sends waiting at once")
    p.add_argument("--sends", type=int, default=3000, help="measured sends per concurrency (default 3000)")
    args = p.parse_args(argv)
    results = run_benchmark(lambda tmp, _loop: run(args, tmp))
    if results is None:
        return 2
    print(json.dumps({"results": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
