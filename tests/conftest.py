"""Shared fixtures. With TEST_POSTGRES_URL (set by `python -m tests.harness`) the suite runs on the real
profile: PostgreSQL, Redis and SeaweedFS. Without it, on the embedded one: SQLite, in-process bus, local disk."""

from __future__ import annotations

import asyncio
import gc
import itertools
import json
import logging
import os
import random
import secrets
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any
from uuid import UUID

import asyncpg
import msgspec
import pytest
from litestar.testing import AsyncTestClient
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker, create_async_engine

from app.accounts.service import AccountService
from app.accounts.tokens import TokenIssuer
from app.limits import InProcessLimiter
from app.main import create_app
from app.migrate import upgrade
from app.notifications.sms import LogSms
from app.settings import Settings

pytest_plugins = ["tests.standins.fixtures"]  # fcm_standin, apns_standin: the push providers on loopback

POSTGRES = os.environ.get("TEST_POSTGRES_URL")
PROFILE = "real" if POSTGRES else "embedded"


def pytest_report_header() -> str:
    return f"profile: {PROFILE}"


class _StuckShutdowns(logging.Handler):
    """A shutdown step that did not end in time is a defect even though the process still stops: every one is
    kept, with where each task waited, and listed at the end of the run. STRICT_SHUTDOWN=1 fails the test whose app
    it was (or the run, for a module's or the session's app) instead."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.seen: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage() == "a shutdown step did not end in time":
            tasks = "\n    ".join(getattr(record, "tasks", []))
            self.seen.append(f"step {getattr(record, 'step', '?')!r}; tasks:\n    {tasks}")


STUCK_SHUTDOWNS = _StuckShutdowns()
logging.getLogger("app").addHandler(STUCK_SHUTDOWNS)  # the app's own logger: configure_logging leaves it be
STRICT_SHUTDOWN = os.environ.get("STRICT_SHUTDOWN") == "1"


@pytest.fixture(autouse=True)
def _shutdowns_end_in_time(request: pytest.FixtureRequest) -> Iterator[None]:
    before = len(STUCK_SHUTDOWNS.seen)
    yield  # torn down last: after the test's own apps have stopped
    stuck = STUCK_SHUTDOWNS.seen[before:]
    if request.node.get_closest_marker("stalls_a_shutdown_step") is not None:
        del STUCK_SHUTDOWNS.seen[before:]  # on purpose: not the run's defect
    elif stuck:
        STUCK_SHUTDOWNS.seen[before:] = [f"{request.node.nodeid}: {entry}" for entry in stuck]
        if STRICT_SHUTDOWN:
            pytest.fail("a shutdown step did not end in time:\n" + "\n".join(stuck), pytrace=False)


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if STUCK_SHUTDOWNS.seen:
        terminalreporter.section("shutdown steps that did not end in time")
        terminalreporter.write_line("\n".join(STUCK_SHUTDOWNS.seen))


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if STUCK_SHUTDOWNS.seen and STRICT_SHUTDOWN:  # a module's or the session's app: no test of its own to fail
        session.exitstatus = session.exitstatus or 1


async def create_database(name: str) -> str:
    """A fresh PostgreSQL database on the harness's server; returns its SQLAlchemy URL."""
    assert POSTGRES
    admin = await asyncpg.connect(POSTGRES.replace("postgresql+asyncpg", "postgresql") + "/postgres")
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    return f"{POSTGRES}/{name}"


async def fresh_database_url(tmp: Path, name: str) -> str:
    return await create_database(name) if POSTGRES else f"sqlite+aiosqlite:///{tmp / (name + '.db')}"


async def migrated_database_url(tmp: Path, prefix: str) -> str:
    """A database of the caller's own (PostgreSQL on the harness, else SQLite under `tmp`), migrated to head:
    for a module or test whose outbox, workers or rows no other test may share."""
    url = await fresh_database_url(tmp, f"{prefix}_{secrets.token_hex(4)}")
    await asyncio.to_thread(upgrade, url)
    return url


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("data")


@pytest.fixture(scope="session")
async def database_url(data_dir: Path) -> str:
    return await migrated_database_url(data_dir, "clinic")


@pytest.fixture(scope="session")
def test_settings(data_dir: Path, database_url: str) -> Settings:
    return Settings(
        data_dir=str(data_dir),
        database_url=database_url,
        redis_url=os.environ.get("TEST_REDIS_URL"),
        s3_endpoint_url=os.environ.get("TEST_S3_ENDPOINT_URL"),
        s3_access_key=os.environ.get("TEST_S3_ACCESS_KEY"),
        s3_secret_key=os.environ.get("TEST_S3_SECRET_KEY"),
        s3_bucket=f"clinic-{secrets.token_hex(3)}",
        sms_log_path=str(data_dir / "sms.log"),
        jwt_keys=f"t1={secrets.token_urlsafe(40)}",
        secret_key=secrets.token_urlsafe(40),
        otp_per_ip_per_hour=1_000_000,  # every test client shares one address; the limit has its own test
        revocation_poll_seconds=0.25,  # a second embedded instance hears revocations from the database this soon
        start_early_minutes=7 * 24 * 60,  # tests start visits booked ahead; the start window has its own test
        log_requests=False,
        log_level="WARNING",
    )


@asynccontextmanager
async def running(settings: Settings) -> AsyncIterator[AsyncTestClient[Any]]:
    try:
        async with AsyncTestClient(app=create_app(settings)) as client:
            yield client
    finally:
        # an app stopped in-process leaves its objects to the garbage collector, which the app tunes to run
        # rarely (app/main.py): collected now, as a process exit would, a connection it left behind is closed
        # before the next test instead of holding SQLite's write lock for many seconds
        gc.collect()


@pytest.fixture(scope="session")
async def client(test_settings: Settings) -> AsyncIterator[AsyncTestClient[Any]]:
    async with running(test_settings) as c:
        yield c


@pytest.fixture(scope="session")
async def session_maker(database_url: str) -> AsyncIterator[async_sessionmaker[AsyncSession]]:
    engine = create_async_engine(database_url)
    yield async_sessionmaker(engine, expire_on_commit=False)
    await engine.dispose()


_numbers = itertools.count(random.randrange(1_000_000, 8_000_000))


@pytest.fixture
def new_phone() -> Callable[[], str]:
    """A phone no other test uses (Moscow mobile range, always valid)."""
    return lambda: f"+7916{next(_numbers):07d}"


def read_code(settings: Settings, phone: str) -> str:
    lines = Path(settings.resolved_sms_log_path).read_text().splitlines()
    for line in reversed(lines):
        entry = json.loads(line)
        if entry["to"] == phone:
            return str(entry["text"].split("code: ")[1][:6])
    raise AssertionError(f"no SMS to {phone}")


def refused(answer: Any, status: int, reason: str | None = None) -> None:
    """The answer is the contract's error body with this status (and reason code, when given)."""
    assert answer.status_code == status, answer.text
    body = answer.json()
    assert set(body) == {"status_code", "detail", "extra"}
    assert body["status_code"] == status
    if reason is not None:
        assert body["extra"]["reason"] == reason, body


class Session(msgspec.Struct):
    id: UUID
    phone: str
    access: str
    refresh: str

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.access}"}


@pytest.fixture
def login(client: AsyncTestClient[Any], test_settings: Settings) -> Callable[[str], Any]:
    async def do(phone: str) -> Session:
        assert (await client.post("/api/v1/auth/otp", json={"phone": phone})).status_code == 202
        code = read_code(test_settings, phone)
        answer = await client.post("/api/v1/auth/token", json={"phone": phone, "code": code})
        assert answer.status_code == 200, answer.text
        body = answer.json()
        return Session(id=UUID(body["user"]["id"]), phone=phone, access=body["access_token"],
                       refresh=body["refresh_token"])

    return do


@pytest.fixture
async def patient(login: Callable[[str], Any], new_phone: Callable[[], str]) -> Session:
    session: Session = await login(new_phone())
    return session


@pytest.fixture
def accounts_for(test_settings: Settings, session_maker: async_sessionmaker[AsyncSession]) -> Any:
    """An AccountService on its own session, for arranging what the API cannot (the first admin)."""

    @asynccontextmanager
    async def make() -> AsyncIterator[AccountService]:
        async with session_maker() as session:
            yield AccountService(session, test_settings, TokenIssuer(test_settings), InProcessLimiter(),
                                 LogSms(test_settings.resolved_sms_log_path))
            await session.commit()

    return make


@pytest.fixture
async def admin(accounts_for: Any, login: Callable[[str], Any], new_phone: Callable[[], str]) -> Session:
    phone = new_phone()
    async with accounts_for() as accounts:
        await accounts.ensure_admin(phone, "Test Admin")
    session: Session = await login(phone)
    return session


@pytest.fixture
def staff(client: AsyncTestClient[Any], admin: Session, login: Callable[[str], Any],
          new_phone: Callable[[], str]) -> Callable[..., Any]:
    """Create a staff member through the admin API and sign them in."""

    async def make(role: str, specialties: list[str] | None = None) -> Session:
        phone = new_phone()
        answer = await client.post("/api/v1/staff", headers=admin.headers, json={
            "phone": phone, "full_name": f"Test {role}", "role": role, "specialties": specialties or []})
        assert answer.status_code == 201, answer.text
        session: Session = await login(phone)
        return session

    return make
