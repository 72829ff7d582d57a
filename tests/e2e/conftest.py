"""Real server processes (`python -m app serve`) for end-to-end tests with real WebSocket clients."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import pytest

from app.settings import Settings
from tests.conftest import PROFILE
from tests.harness import free_port
from tests.integration.conftest import book, service, specialist, visit_until  # noqa: F401  (shared fixtures)

ROOT = Path(__file__).resolve().parents[2]
PIDS: dict[str, int] = {}  # base URL -> the server's process id (one worker: uvicorn serves in that process)


def log_path(settings: Settings, url: str) -> Path:
    """Where the server at `url` writes its stdout and stderr."""
    return Path(settings.data_dir) / f"server-{url.rsplit(':', 1)[1]}.log"


def server_env(settings: Settings, port: int, **extra: str) -> dict[str, str]:
    env = {**os.environ, "PORT": str(port), "HOST": "127.0.0.1", "DATA_DIR": settings.data_dir,
           "DATABASE_URL": settings.resolved_database_url, "JWT_KEYS": settings.jwt_keys,
           "SECRET_KEY": settings.secret_key, "SMS_LOG_PATH": str(settings.resolved_sms_log_path),
           "LOG_LEVEL": "WARNING", "LOG_REQUESTS": "false", "OTP_PER_IP_PER_HOUR": "1000000"}
    for name in ("redis_url", "s3_endpoint_url", "s3_access_key", "s3_secret_key", "s3_bucket"):
        value = getattr(settings, name)
        if value:
            env[name.upper()] = str(value)
    env.update(extra)
    return env


def log_tail(path: Path, lines: int = 40) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else "(no log)"


@asynccontextmanager
async def servers(settings: Settings, count: int = 1, **extra: str) -> AsyncIterator[list[str]]:
    """`count` API processes sharing the test database (and Redis in the real profile); yields base URLs."""
    procs: list[subprocess.Popen[bytes]] = []
    urls = []
    try:
        for _ in range(count):
            port = free_port()
            log = open(Path(settings.data_dir) / f"server-{port}.log", "wb")  # noqa: SIM115
            procs.append(subprocess.Popen([sys.executable, "-m", "app", "serve"], cwd=ROOT, stdout=log,
                                          stderr=subprocess.STDOUT, env=server_env(settings, port, **extra)))
            urls.append(f"http://127.0.0.1:{port}")
            PIDS[urls[-1]] = procs[-1].pid
        async with httpx.AsyncClient() as http:
            # a generous wait: on a busy machine importing the app alone takes seconds
            deadline = time.monotonic() + 60
            for url, proc in zip(urls, procs, strict=True):
                while time.monotonic() < deadline:
                    if proc.poll() is not None:
                        raise RuntimeError(f"server {url} exited with {proc.returncode}")
                    try:
                        if (await http.get(f"{url}/health/ready")).status_code == 200:
                            break
                    except httpx.TransportError:
                        pass
                    await asyncio.sleep(0.05)
                else:
                    answer = "no answer"
                    with contextlib.suppress(httpx.TransportError):
                        answer = (await http.get(f"{url}/health/ready")).text
                    raise RuntimeError(f"server {url} did not become ready ({answer}); its log ends:\n"
                                       + log_tail(Path(settings.data_dir) / f"server-{url.rsplit(':', 1)[1]}.log"))
        yield urls
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()


@pytest.fixture(scope="session")
async def api(test_settings: Settings) -> AsyncIterator[list[str]]:
    """The servers every e2e test without settings of its own shares (each start costs seconds): two
    processes sharing PostgreSQL and Redis in the real profile, so events cross processes; one embedded."""
    async with servers(test_settings, 2 if PROFILE == "real" else 1) as urls:
        yield urls
