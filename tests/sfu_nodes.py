"""SFU nodes for tests: real `python -m app sfu` processes, or a node app served by uvicorn in the test's own
process (so a test can reach its engine and registration), both on loopback TCP."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

import httpx
import msgspec
import uvicorn

from app.rtc.sfu.node import Node, create_node_app
from app.settings import Settings
from tests.harness import free_port

ROOT = Path(__file__).resolve().parents[1]
SECRET = "sfu-test-secret-0123456789abcdef"


def auth(secret: str = SECRET) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}


@dataclass
class NodeProcess:
    url: str
    proc: subprocess.Popen[bytes]
    log: Path

    def kill(self) -> None:
        """SIGKILL: no goodbye, no deregistration."""
        self.proc.kill()
        self.proc.wait()

    def stop(self) -> int:
        """SIGTERM and wait for the exit: rooms closed, registration deleted."""
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=30)


def node_env(settings: Settings, port: int, **extra: str) -> dict[str, str]:
    env = {**os.environ, "SFU_LISTEN": f"127.0.0.1:{port}", "SFU_SECRET": SECRET, "DATA_DIR": settings.data_dir,
           "LOG_LEVEL": "WARNING", "RTC_HOST_ADDRESSES": "127.0.0.1"}
    env.pop("REDIS_URL", None)
    if settings.redis_url:
        env["REDIS_URL"] = settings.redis_url
    env.update(extra)
    return env


async def until_healthy(url: str, proc: subprocess.Popen[bytes] | None = None, timeout: float = 120.0) -> None:
    """Until the node answers its health check (a generous bound: on a busy machine importing aiortc takes
    seconds)."""
    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient(headers=auth(), timeout=5) as http:
        while time.monotonic() < deadline:
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"SFU node {url} exited with {proc.returncode}")
            try:
                if (await http.get(f"{url}/health")).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            await asyncio.sleep(0.05)
    raise RuntimeError(f"SFU node {url} did not become healthy")


@asynccontextmanager
async def node_process(settings: Settings, port: int | None = None, **extra: str) -> AsyncIterator[NodeProcess]:
    """One `python -m app sfu` process (on `port`, or a free one); SIGTERM (then SIGKILL) at the end if it still
    runs."""
    port = port or free_port()
    log = Path(settings.data_dir) / f"sfu-{port}.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "app", "sfu"], cwd=ROOT, stdout=out,
                                stderr=subprocess.STDOUT, env=node_env(settings, port, **extra))
    node = NodeProcess(f"http://127.0.0.1:{port}", proc, log)
    try:
        await until_healthy(node.url, proc)
        yield node
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@asynccontextmanager
async def node_server(settings: Settings, port: int = 0, **changes: object) -> AsyncIterator[tuple[str, Node]]:
    """A node app in this process behind a real uvicorn listener (on `port`, or a free one); yields its URL and
    its Node, ready."""
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", port))
    listener.listen(64)
    port = listener.getsockname()[1]
    node_settings = msgspec.structs.replace(settings, sfu_secret=SECRET, sfu_listen=f"127.0.0.1:{port}", **changes)
    app = create_node_app(node_settings)
    server = uvicorn.Server(uvicorn.Config(app, lifespan="on", log_config=None, access_log=False))
    serving = asyncio.create_task(server.serve(sockets=[listener]))
    url = f"http://127.0.0.1:{port}"
    try:
        await until_healthy(url)  # connections wait in the backlog until the lifespan has started
        yield url, app.state.node
    finally:
        server.should_exit = True
        with suppress(asyncio.CancelledError):
            await serving
        listener.close()
