"""What the benchmarks share: a raw HTTP/1.1 keep-alive client (and an httpx one), the SMS log, CPU and memory
read from /proc, latency statistics, a bench database, and the server started as a child process.

Each benchmark runs under `python -m tests.harness` (real PostgreSQL, Redis and SeaweedFS on loopback) and
talks only to 127.0.0.1.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import resource
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import asyncpg
import httpx
import msgspec

from app.migrate import upgrade

HOST = "127.0.0.1"
ROOT = Path(__file__).resolve().parent.parent
REQUEST_TIMEOUT = 30.0
CLK_TCK = os.sysconf("SC_CLK_TCK")
CODE = re.compile(rb"code: (\d+)")


# --- HTTP clients: a minimal raw keep-alive one, or httpx -------------------------------------


class Http(Protocol):
    async def request(self, method: str, path: str, body: Any = None, token: str | None = None,
                      headers: dict[str, str] | None = None) -> tuple[int, bytes]:
        """(status, body) of one request; raises OSError/TimeoutError/HttpError on transport failures."""

    async def aclose(self) -> None: ...


class HttpError(Exception):
    pass


class RawConnection:
    """One HTTP/1.1 keep-alive connection to the server; answers must carry Content-Length (Litestar's do).

    Used by one task at a time. After any transport error it reconnects on the next request. The headers of
    the last answer are kept in `last_headers` (names lower-cased).
    """

    def __init__(self, port: int) -> None:
        self.port = port
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._host_header = f"Host: {HOST}:{port}\r\n".encode()
        self.last_headers: dict[bytes, bytes] = {}

    async def request(self, method: str, path: str, body: Any = None, token: str | None = None,
                      headers: dict[str, str] | None = None) -> tuple[int, bytes]:
        try:
            async with asyncio.timeout(REQUEST_TIMEOUT):
                return await self._exchange(method, path, body, token, headers)
        except BaseException:
            await self.aclose()  # the stream is in an unknown state
            raise

    async def _exchange(self, method: str, path: str, body: Any, token: str | None,
                        headers: dict[str, str] | None) -> tuple[int, bytes]:
        if self._writer is None:
            self._reader, self._writer = await asyncio.open_connection(HOST, self.port)
        assert self._reader is not None
        head = [f"{method} {path} HTTP/1.1\r\n".encode(), self._host_header]
        payload = b""
        if token is not None:
            head.append(f"Authorization: Bearer {token}\r\n".encode())
        if headers:
            head.extend(f"{name}: {value}\r\n".encode() for name, value in headers.items())
        if body is not None:
            payload = msgspec.json.encode(body)
            head.append(b"Content-Type: application/json\r\n")
        head.append(f"Content-Length: {len(payload)}\r\n\r\n".encode())
        self._writer.write(b"".join(head) + payload)
        raw_head = await self._reader.readuntil(b"\r\n\r\n")
        status_line, *header_lines = raw_head[:-4].split(b"\r\n")
        status = int(status_line.split(b" ", 2)[1])
        length, close = None, False
        self.last_headers = received = {}
        for line in header_lines:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            received[name] = value.strip()
            if name == b"content-length":
                length = int(value)
            elif name == b"transfer-encoding":
                raise HttpError("chunked responses are not supported by the raw client")
            elif name == b"connection" and value.strip().lower() == b"close":
                close = True
        if status in (204, 304) or status < 200:
            length = 0  # never a body (RFC 9110 6.4.1), whatever the headers say
        elif length is None:
            raise HttpError(f"response without Content-Length (status {status})")
        data = await self._reader.readexactly(length) if length else b""
        if close:
            await self.aclose()
        return status, data

    async def aclose(self) -> None:
        writer, self._reader, self._writer = self._writer, None, None
        if writer is not None:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()


class HttpxClient:
    """A view of one shared httpx.AsyncClient (its pool is sized to the concurrency)."""

    def __init__(self, client: httpx.AsyncClient) -> None:
        self._client = client

    async def request(self, method: str, path: str, body: Any = None, token: str | None = None,
                      headers: dict[str, str] | None = None) -> tuple[int, bytes]:
        headers = dict(headers or {})
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        content = msgspec.json.encode(body) if body is not None else None
        if content is not None:
            headers["Content-Type"] = "application/json"
        try:
            response = await self._client.request(method, path, content=content, headers=headers)
        except httpx.TimeoutException as exc:
            raise TimeoutError(str(exc)) from exc
        except httpx.HTTPError as exc:
            raise HttpError(f"{type(exc).__name__}: {exc}") from exc
        return response.status_code, response.content

    async def aclose(self) -> None:
        return None  # the shared client is closed by its owner


@contextlib.asynccontextmanager
async def http_clients(kind: str, port: int, count: int) -> AsyncIterator[list[Http]]:
    """`count` clients, one per concurrent task."""
    if kind == "raw":
        conns: list[Http] = [RawConnection(port) for _ in range(count)]
        try:
            yield conns
        finally:
            for c in conns:
                await c.aclose()
        return
    limits = httpx.Limits(max_connections=count, max_keepalive_connections=count)
    async with httpx.AsyncClient(base_url=f"http://{HOST}:{port}", limits=limits,
                                 timeout=REQUEST_TIMEOUT) as shared:
        yield [HttpxClient(shared) for _ in range(count)]


# --- the SMS log, tailed into an index --------------------------------------------------------


class SmsInbox:
    """Codes by phone, from the JSON lines the server appends; only new bytes are read each time.

    The server writes the line before it answers 202, so a code is normally there on the first look.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file: Any = None
        self._partial = b""
        self._codes: dict[str, str] = {}

    def _drain(self) -> None:
        if self._file is None:
            if not self.path.exists():
                return
            self._file = self.path.open("rb")
        data = self._file.read()
        if not data:
            return
        *lines, self._partial = (self._partial + data).split(b"\n")
        for line in lines:
            if not line.strip():
                continue
            entry = msgspec.json.decode(line)
            found = CODE.search(entry["text"].encode())
            if found:
                self._codes[entry["to"]] = found.group(1).decode()

    async def code_for(self, phone: str, timeout: float = 5.0) -> str:
        deadline = time.monotonic() + timeout
        while True:
            self._drain()
            code = self._codes.pop(phone, None)  # each phone logs in once: forget it, memory stays flat
            if code is not None:
                return code
            if time.monotonic() > deadline:
                raise TimeoutError(f"no SMS to {phone} within {timeout}s")
            await asyncio.sleep(0.005)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


# --- CPU and memory from /proc ----------------------------------------------------------------


def _stat_fields(pid: int) -> list[str]:
    """Fields 3.. of /proc/<pid>/stat (the name before them may hold spaces and parentheses)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat[stat.rindex(")") + 2:].split()


def proc_cpu_seconds(pid: int, reaped_children: bool = False) -> float:
    """utime + stime of a process (all its threads), plus its waited-for children's if asked."""
    fields = _stat_fields(pid)
    ticks = int(fields[11]) + int(fields[12])  # utime, stime
    if reaped_children:
        ticks += int(fields[13]) + int(fields[14])  # cutime, cstime
    return ticks / CLK_TCK


def proc_memory_mib(pid: int) -> dict[str, float]:
    """VmRSS (now) and VmHWM (peak RSS) in MiB."""
    out: dict[str, float] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0]) / 1024
    return out


def parent_pid(pid: int) -> int:
    return int(_stat_fields(pid)[1])


def tree_cpu_seconds(root: int) -> float:
    """A PostgreSQL server's CPU: the postmaster, its live backends, and the backends that already exited
    (the postmaster reaps them, so their time is in its cutime/cstime)."""
    total = proc_cpu_seconds(root, reaped_children=True)
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, ValueError, IndexError):
                if parent_pid(int(entry.name)) == root:
                    total += proc_cpu_seconds(int(entry.name))
    return total


def find_redis_pid(port: int) -> int | None:
    """The harness's redis-server: the one whose process title ("redis-server 127.0.0.1:PORT") names its port."""
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                title = (entry / "cmdline").read_bytes().replace(b"\0", b" ")
                if (entry / "comm").read_text().strip() == "redis-server" and f":{port}".encode() in title:
                    return int(entry.name)
    return None


@dataclass(frozen=True)
class Pids:
    server: int
    postmaster: int | None
    redis: int | None


def machine_busy_jiffies() -> tuple[int, int]:
    """(busy, total) jiffies of all cores, from /proc/stat."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    total = sum(values[:8])  # guest time is already inside user
    return total - idle, total


def self_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


@dataclass
class CpuSnapshot:
    server: float
    client: float
    postgres: float
    redis: float
    busy: int
    total: int
    wall: float

    @classmethod
    def take(cls, pids: Pids) -> CpuSnapshot:
        busy, total = machine_busy_jiffies()
        return cls(server=proc_cpu_seconds(pids.server), client=self_cpu_seconds(),
                   postgres=tree_cpu_seconds(pids.postmaster) if pids.postmaster else 0.0,
                   redis=proc_cpu_seconds(pids.redis) if pids.redis else 0.0,
                   busy=busy, total=total, wall=time.perf_counter())


def cpu_used(before: CpuSnapshot, after: CpuSnapshot) -> dict[str, float]:
    """CPU seconds between two snapshots; `other` is the rest of the machine (other users, SeaweedFS, kernel)."""
    total = max(1, after.total - before.total)
    parts = {
        "server_cpu_s": after.server - before.server,
        "client_cpu_s": after.client - before.client,
        "postgres_cpu_s": after.postgres - before.postgres,
        "redis_cpu_s": after.redis - before.redis,
    }
    busy_s = (after.busy - before.busy) / CLK_TCK
    return {
        **{k: round(v, 2) for k, v in parts.items()},
        "other_cpu_s": round(max(0.0, busy_s - sum(parts.values())), 2),
        "machine_busy_pct": round(100 * (after.busy - before.busy) / total, 1),
        "wall_s": round(after.wall - before.wall, 2),
    }


# --- statistics -------------------------------------------------------------------------------


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of an ascending list (0 when empty)."""
    if not sorted_values:
        return 0.0
    rank = max(1, min(len(sorted_values), round(q / 100 * len(sorted_values) + 0.5)))
    return sorted_values[rank - 1]


def latency_summary(seconds: list[float]) -> dict[str, float]:
    ms = sorted(s * 1000 for s in seconds)
    return {"p50_ms": round(percentile(ms, 50), 2), "p99_ms": round(percentile(ms, 99), 2),
            "max_ms": round(ms[-1], 2) if ms else 0.0}


@dataclass
class Errors:
    counts: Counter[str] = field(default_factory=Counter)
    samples: list[str] = field(default_factory=list)

    def add(self, kind: str, detail: str) -> None:
        self.counts[kind] += 1
        if len(self.samples) < 5:
            self.samples.append(f"{kind}: {detail[:300]}")

    @property
    def total(self) -> int:
        return sum(self.counts.values())


TRANSPORT_ERRORS = (OSError, TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, HttpError)


# --- a timed window of GETs: clients loop as fast as answers come, counted inside the window -----

Check = Callable[[Http, int, bytes], str | None]  # None when the answer is right, else what is wrong
MAX_WINDOW_REQUESTS = 2_000_000  # a bound on the count of a timed scenario, far above what one worker serves


def text(body: bytes) -> str:
    return body.decode(errors="replace")[:300]


def status_is(expected: int) -> Check:
    def check(http: Http, status: int, body: bytes) -> str | None:
        return None if status == expected else f"status {status}"

    return check


@dataclass
class Window:
    start: float = float("inf")
    end: float = float("inf")
    stop: bool = False
    sent: int = 0
    latencies: list[float] = field(default_factory=list)  # of right answers inside the window
    statuses: Counter[int] = field(default_factory=Counter)
    wrong: int = 0  # wrong answers inside the window
    errors: Errors = field(default_factory=Errors)  # transport errors and wrong answers, warm-up included


async def window_worker(http: Http, path: str, token: str | None, headers: dict[str, str] | None,
                        check: Check, w: Window) -> None:
    while not w.stop and w.sent < MAX_WINDOW_REQUESTS:
        w.sent += 1
        t0 = time.perf_counter()
        try:
            status, body = await http.request("GET", path, token=token, headers=headers)
        except TRANSPORT_ERRORS as exc:
            w.errors.add(f"{type(exc).__name__}", str(exc))
            await asyncio.sleep(0.01)  # do not spin on a dead server
            continue
        t1 = time.perf_counter()
        problem = check(http, status, body)
        if problem is not None:
            w.errors.add(problem, text(body))
        if w.start <= t1 <= w.end:  # counted by completion time inside the measured window
            w.statuses[status] += 1
            if problem is None:
                w.latencies.append(t1 - t0)
            else:
                w.wrong += 1


async def timed(clients: Sequence[Http], path: str, tokens: Sequence[str | None], headers: dict[str, str] | None,
                check: Check, pids: Pids, warmup: float, seconds: float) -> dict[str, Any]:
    """Every client GETs `path` in a loop (client i with tokens[i % len(tokens)]); after the warm-up, what
    completes inside `seconds` is counted, with the CPU each process used meanwhile."""
    w = Window()
    workers = [asyncio.create_task(window_worker(c, path, tokens[i % len(tokens)], headers, check, w))
               for i, c in enumerate(clients)]
    try:
        await asyncio.sleep(warmup)
        before = CpuSnapshot.take(pids)
        w.start = before.wall
        await asyncio.sleep(seconds)
        after = CpuSnapshot.take(pids)
        w.end = after.wall
    finally:
        w.stop = True
        await asyncio.gather(*workers, return_exceptions=True)
    usage = cpu_used(before, after)
    done = sum(w.statuses.values())
    return {
        "path": path, "requests": done,
        "requests_per_s": round(done / usage["wall_s"], 1) if usage["wall_s"] else 0.0,
        **latency_summary(w.latencies), "statuses": {str(k): v for k, v in sorted(w.statuses.items())},
        "wrong_in_window": w.wrong, "errors": w.errors.total, "error_kinds": dict(w.errors.counts),
        "error_samples": w.errors.samples, **usage,
        **{f"server_{k}_mib": round(v, 1) for k, v in proc_memory_mib(pids.server).items()},
    }


# --- database and server ----------------------------------------------------------------------


async def create_database(postgres_url: str) -> tuple[str, str]:
    name = f"bench_{secrets.token_hex(4)}"
    admin = await asyncpg.connect(postgres_url.replace("postgresql+asyncpg", "postgresql") + "/postgres")
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    url = f"{postgres_url}/{name}"
    await asyncio.to_thread(upgrade, url)  # alembic runs its own event loop: off this one
    return name, url


async def drop_database(postgres_url: str, name: str) -> None:
    admin = await asyncpg.connect(postgres_url.replace("postgresql+asyncpg", "postgresql") + "/postgres")
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


class DbStats:
    """The bench database's session counter: how many connections the server opened (pool churn shows here).

    A backend's first transaction publishes its session, so the count is current while the server is busy.
    """

    def __init__(self, postgres_url: str, name: str) -> None:
        self.dsn = postgres_url.replace("postgresql+asyncpg", "postgresql") + "/postgres"
        self.name = name

    async def sessions(self) -> int:
        conn = await asyncpg.connect(self.dsn)
        try:
            return int(await conn.fetchval("SELECT sessions FROM pg_stat_database WHERE datname = $1", self.name))
        finally:
            await conn.close()

    async def postmaster_pid(self) -> int | None:
        """The server's main process: the parent of the backend that serves us (None if not local)."""
        conn = await asyncpg.connect(self.dsn)
        try:  # read while the backend lives
            return parent_pid(int(await conn.fetchval("SELECT pg_backend_pid()")))
        except OSError:
            return None
        finally:
            await conn.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def server_log_lines(path: Path, limit: int = 10) -> list[str]:
    """What the server logged besides its banner (at LOG_LEVEL=WARNING: warnings and errors), first `limit`."""
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return []
    return [line[:500] for line in lines if line.strip() and not line.startswith("Clinic API:")][:limit]


def tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def server_env(database_url: str, tmp: Path, port: int, extra: dict[str, str]) -> dict[str, str]:
    """The server's settings: the harness's services, SMS to a log under `tmp`, no request log, OTP limits off.

    Also the settings for `python -m app create-admin`, which must reach the same database."""
    return {
        **os.environ,
        "DATABASE_URL": database_url, "REDIS_URL": os.environ["TEST_REDIS_URL"],
        "S3_ENDPOINT_URL": os.environ["TEST_S3_ENDPOINT_URL"], "S3_ACCESS_KEY": os.environ["TEST_S3_ACCESS_KEY"],
        "S3_SECRET_KEY": os.environ["TEST_S3_SECRET_KEY"], "DATA_DIR": str(tmp / "data"), "HOST": HOST,
        "PORT": str(port), "LOG_REQUESTS": "false", "LOG_LEVEL": "WARNING",
        "OTP_PER_IP_PER_HOUR": "100000000", "SMS_BACKEND": "log", "SMS_LOG_PATH": str(tmp / "sms.log"),
        **extra,
    }


def start_server(database_url: str, tmp: Path, port: int, extra: dict[str, str]) -> subprocess.Popen[bytes]:
    env = server_env(database_url, tmp, port, extra)
    with (tmp / "server.log").open("wb") as log:
        return subprocess.Popen([sys.executable, "-m", "app", "serve"], cwd=ROOT, env=env,
                                stdout=log, stderr=subprocess.STDOUT)


def stop_server(proc: subprocess.Popen[bytes]) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


async def wait_ready(proc: subprocess.Popen[bytes], port: int, log: Path, timeout: float = 30.0) -> float:
    started = time.monotonic()
    async with httpx.AsyncClient(base_url=f"http://{HOST}:{port}", timeout=3.0) as client:
        while time.monotonic() - started < timeout:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode}:\n{tail(log)}")
            with contextlib.suppress(httpx.HTTPError):
                if (await client.get("/health/ready")).status_code == 200:
                    return time.monotonic() - started
            await asyncio.sleep(0.1)
    raise RuntimeError(f"server not ready within {timeout}s:\n{tail(log)}")


# --- report -----------------------------------------------------------------------------------


def known(value: float, pid: int | None) -> str:
    return str(value) if pid else "n/a (process not found)"


def env_pair(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name.isidentifier():
        raise argparse.ArgumentTypeError("expected NAME=VALUE")
    return name.upper(), value


def stop_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)




HARNESS_VARIABLES = ("TEST_POSTGRES_URL", "TEST_REDIS_URL", "TEST_S3_ENDPOINT_URL", "TEST_S3_ACCESS_KEY",
                     "TEST_S3_SECRET_KEY")


def missing_harness_variables() -> list[str]:
    """The harness's variables that are not set (all are when run under `python -m tests.harness`)."""
    return [v for v in HARNESS_VARIABLES if v not in os.environ]


def pg_dsn(postgres_url: str, database: str) -> str:
    """An asyncpg DSN for one database of the harness's PostgreSQL (its URL is SQLAlchemy's)."""
    return postgres_url.replace("postgresql+asyncpg", "postgresql") + "/" + database


# --- signing in -------------------------------------------------------------------------------


async def sign_in(http: Http, inbox: SmsInbox, phone: str) -> dict[str, Any]:
    """OTP login of one phone (a new one becomes a patient): the token answer `{access_token, user, ...}`."""
    status, body = await http.request("POST", "/api/v1/auth/otp", {"phone": phone})
    if status != 202:
        raise HttpError(f"otp for {phone}: {status} {body.decode(errors='replace')[:300]}")
    code = await inbox.code_for(phone)
    status, body = await http.request("POST", "/api/v1/auth/token", {"phone": phone, "code": code})
    if status != 200:
        raise HttpError(f"token for {phone}: {status} {body.decode(errors='replace')[:300]}")
    answer: dict[str, Any] = msgspec.json.decode(body)
    return answer


def create_admin(database_url: str, tmp: Path, port: int, extra: dict[str, str], phone: str) -> None:
    """`python -m app create-admin --phone PHONE` with the server's settings (it migrates first: a no-op)."""
    done = subprocess.run([sys.executable, "-m", "app", "create-admin", "--phone", phone, "--full-name", "Bench Admin"],
                          cwd=ROOT, env=server_env(database_url, tmp, port, extra), capture_output=True, timeout=120)
    if done.returncode != 0:
        raise RuntimeError(f"create-admin failed ({done.returncode}): "
                           f"{(done.stdout + done.stderr).decode(errors='replace')[-2000:]}")



def run_benchmark(run: Callable[[Path, str], Coroutine[Any, Any, Any]]) -> Any | None:
    """The shared frame of every benchmark's main: the harness's variables, uvloop when installed, a
    SIGTERM that still stops the server, a temp dir; returns what `run(tmp, loop_name)` returns, or None
    (after saying why) when not run under `python -m tests.harness`."""
    missing = missing_harness_variables()
    if missing:
        print(f"missing {', '.join(missing)}: run under `python -m tests.harness`", file=sys.stderr)
        return None
    try:
        import uvloop
    except ImportError:
        uvloop = None  # type: ignore[assignment]
    signal.signal(signal.SIGTERM, stop_on_sigterm)  # so the finally blocks stop the server
    with tempfile.TemporaryDirectory(prefix="clinic-bench-") as tmp:
        coro = run(Path(tmp), "uvloop" if uvloop else "asyncio")
        return uvloop.run(coro) if uvloop else asyncio.run(coro)
