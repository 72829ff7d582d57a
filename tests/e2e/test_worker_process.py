"""The outbox worker as real processes: killed between its claim and the provider's answer, then restarted, the
push is delivered (with the same collapse key) and never again after that; two workers side by side never send a
row twice. Real profile: `python -m app worker` processes on PostgreSQL; embedded: the API process, whose worker
it is (SQLite has no worker process of its own: `worker` refuses it)."""

from __future__ import annotations

import asyncio
import secrets
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager, suppress
from pathlib import Path

import pytest
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker, create_async_engine

from app.accounts.models import Device, User
from app.outbox import OutboxEvent
from app.settings import Settings
from tests.conftest import PROFILE, migrated_database_url
from tests.e2e.conftest import ROOT, server_env
from tests.harness import free_port
from tests.integration.test_outbox_worker import own_settings
from tests.standins.fixtures import FcmFixture

Maker = async_sessionmaker[AsyncSession]


@pytest.fixture
async def world(data_dir: Path, tmp_path: Path) -> AsyncIterator[tuple[Settings, Maker]]:
    """A database of its own (no API worker of the suite's shares it) and a session maker on it."""
    url = await migrated_database_url(tmp_path, "workers")
    settings = own_settings(data_dir, url)
    engine = create_async_engine(url)
    yield settings, async_sessionmaker(engine, expire_on_commit=False)
    await engine.dispose()


@asynccontextmanager
async def worker_process(settings: Settings, fcm: FcmFixture, **extra: str) -> AsyncIterator[subprocess.Popen[bytes]]:
    """One process delivering the outbox: `python -m app worker` (real) or the API server (embedded)."""
    port = free_port()
    command = "worker" if PROFILE == "real" else "serve"
    env = server_env(settings, port, **fcm.env(), OUTBOX_POLL_SECONDS="0.2", **extra)
    log = open(Path(settings.data_dir) / f"worker-{port}.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen([sys.executable, "-m", "app", command], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                            env=env)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
        log.close()


async def people_with_devices(maker: Maker, count: int) -> list[tuple[uuid.UUID, str]]:
    async with maker() as session:
        users = [User(phone=None, full_name="", roles=["patient"], timezone="Europe/Moscow") for _ in range(count)]
        session.add_all(users)
        await session.flush()
        tokens = [f"tok-{secrets.token_hex(10)}" for _ in users]
        session.add_all([Device(user_id=u.id, platform="android", push_token=t, push_token_hash=secrets.token_hex(32))
                         for u, t in zip(users, tokens, strict=True)])
        await session.commit()
        return [(u.id, t) for u, t in zip(users, tokens, strict=True)]


async def notices(maker: Maker, user_ids: list[uuid.UUID]) -> list[uuid.UUID]:
    async with maker() as session:
        rows = [OutboxEvent(type="notice", aggregate_id=uuid.uuid4(), recipients=[str(u)],
                            payload={"kind": "conclusion_ready"}) for u in user_ids]
        session.add_all(rows)
        await session.commit()
        return [r.id for r in rows]


async def dispatched(maker: Maker, ids: list[uuid.UUID]) -> int:
    async with maker() as session:
        return int(await session.scalar(select(func.count()).select_from(OutboxEvent).where(
            OutboxEvent.id.in_(ids), OutboxEvent.dispatched_at.is_not(None))) or 0)


async def eventually(check: Callable[[], Awaitable[bool]], what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout}s: {what}")
        await asyncio.sleep(0.05)


async def test_a_worker_killed_mid_send_is_taken_over_and_the_push_arrives_once_more_at_most(
    world: tuple[Settings, Maker], fcm_standin: FcmFixture,
) -> None:
    settings, maker = world
    [(user_id, token)] = await people_with_devices(maker, 1)
    hold = fcm_standin.hold_sends()
    lease = {"OUTBOX_LEASE_SECONDS": "2"}
    async with worker_process(settings, fcm_standin, **lease) as first:
        [event_id] = await notices(maker, [user_id])
        await asyncio.to_thread(hold.wait_arrived, 1, 90.0)  # claimed, sent, and the answer is not back
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=10)
    fcm_standin.stop_holding()  # the held request is answered to a dead connection: that answer is lost
    async with worker_process(settings, fcm_standin, **lease):
        async def delivered() -> bool:
            return await dispatched(maker, [event_id]) == 1

        await eventually(delivered, "the row is delivered by the restarted worker")
        # a later row through the same worker: by the time it arrives, the first had every chance to repeat
        [later] = await notices(maker, [user_id])

        async def later_delivered() -> bool:
            return await dispatched(maker, [later]) == 1

        await eventually(later_delivered, "a later row is delivered")
    keys = [r.message["android"]["collapse_key"] for r in fcm_standin.requests if r.token == token]
    assert keys.count(event_id.hex) == 2  # the lost answer's push once more, with the same collapse key
    assert keys.count(later.hex) == 1


async def test_two_workers_never_send_a_row_twice(world: tuple[Settings, Maker], fcm_standin: FcmFixture) -> None:
    settings, maker = world
    people = await people_with_devices(maker, 50)
    async with worker_process(settings, fcm_standin, OUTBOX_BATCH_SIZE="50"), \
            worker_process(settings, fcm_standin, OUTBOX_BATCH_SIZE="50"):
        ids: list[uuid.UUID] = []
        for _ in range(10):  # 1,000 rows, committed in ten goes while both workers take them
            ids += await notices(maker, [u for u, _ in people] * 2)

        async def all_delivered() -> bool:
            return await dispatched(maker, ids) == len(ids)

        await eventually(all_delivered, "1,000 rows delivered", timeout=120)
    sent = [(r.message["android"]["collapse_key"], r.token) for r in fcm_standin.requests]
    assert len(sent) == 1000
    assert len(set(sent)) == 1000  # no row's push went out twice


async def test_the_worker_command_refuses_sqlite(data_dir: Path, tmp_path: Path) -> None:
    env = server_env(own_settings(data_dir, f"sqlite+aiosqlite:///{tmp_path / 'x.db'}"), free_port())
    done = await asyncio.to_thread(subprocess.run, [sys.executable, "-m", "app", "worker"], cwd=ROOT, env=env,
                                   capture_output=True, timeout=60)
    assert done.returncode == 2
    assert b"PostgreSQL" in done.stderr
    with suppress(FileNotFoundError):
        (tmp_path / "x.db").unlink()
