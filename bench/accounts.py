"""Load benchmark of phone login and GET /api/v1/me against the real server on real backing services.

    python -m tests.harness python -m bench.accounts [--concurrency 50] [--logins 2000] [--seconds 10]

It makes a fresh PostgreSQL database, migrates it, starts `python -m app serve` (one worker) as a child
process, then runs two scenarios from this process:

  A. OTP login: POST /api/v1/auth/otp, the code read from the SMS log, POST /api/v1/auth/token
     (one operation), for a bounded count of fresh phones and a bounded time;
  B. GET /api/v1/me with tokens from A, for a fixed time after a warm-up.

For each it reports throughput, latency percentiles, errors, the CPU seconds of the server, of this load
generator, of PostgreSQL and Redis and of the rest of the machine, the server's RSS, and how many database
connections the server opened. A table, then one JSON line. Exit status 1 when any request failed.

The default client is a minimal raw HTTP/1.1 keep-alive client (one connection per concurrent task): httpx
costs about as much CPU as the server it measures on a 2-core box (--client httpx to see it).
--server-env NAME=VALUE passes extra settings to the server (e.g. DB_POOL_SIZE=50).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
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
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

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
    async def request(self, method: str, path: str, body: Any = None, token: str | None = None) -> tuple[int, bytes]:
        """(status, body) of one request; raises OSError/TimeoutError/HttpError on transport failures."""

    async def aclose(self) -> None: ...


class HttpError(Exception):
    pass


class RawConnection:
    """One HTTP/1.1 keep-alive connection to the server; answers must carry Content-Length (Litestar's do).

    Used by one task at a time. After any transport error it reconnects on the next request.
    """

    def __init__(self, port: int) -> None:
        self.port = port
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._host_header = f"Host: {HOST}:{port}\r\n".encode()

    async def request(self, method: str, path: str, body: Any = None, token: str | None = None) -> tuple[int, bytes]:
        try:
            async with asyncio.timeout(REQUEST_TIMEOUT):
                return await self._exchange(method, path, body, token)
        except BaseException:
            await self.aclose()  # the stream is in an unknown state
            raise

    async def _exchange(self, method: str, path: str, body: Any, token: str | None) -> tuple[int, bytes]:
        if self._writer is None:
            self._reader, self._writer = await asyncio.open_connection(HOST, self.port)
        assert self._reader is not None
        head = [f"{method} {path} HTTP/1.1\r\n".encode(), self._host_header]
        payload = b""
        if token is not None:
            head.append(f"Authorization: Bearer {token}\r\n".encode())
        if body is not None:
            payload = msgspec.json.encode(body)
            head.append(b"Content-Type: application/json\r\n")
        head.append(f"Content-Length: {len(payload)}\r\n\r\n".encode())
        self._writer.write(b"".join(head) + payload)
        raw_head = await self._reader.readuntil(b"\r\n\r\n")
        status_line, *header_lines = raw_head[:-4].split(b"\r\n")
        status = int(status_line.split(b" ", 2)[1])
        length, close = None, False
        for line in header_lines:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"transfer-encoding":
                raise HttpError("chunked responses are not supported by the raw client")
            elif name == b"connection" and value.strip().lower() == b"close":
                close = True
        if length is None:
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

    async def request(self, method: str, path: str, body: Any = None, token: str | None = None) -> tuple[int, bytes]:
        headers = {"Authorization": f"Bearer {token}"} if token is not None else None
        content = msgspec.json.encode(body) if body is not None else None
        if content is not None:
            headers = {**(headers or {}), "Content-Type": "application/json"}
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


# --- scenario A: login by one-time code -------------------------------------------------------


@dataclass
class LoginResults:
    login: list[float] = field(default_factory=list)
    otp: list[float] = field(default_factory=list)
    token: list[float] = field(default_factory=list)
    tokens: list[str] = field(default_factory=list)
    errors: Errors = field(default_factory=Errors)
    attempted: int = 0


async def login_worker(http: Http, inbox: SmsInbox, numbers: Iterator[int], deadline: float,
                       out: LoginResults) -> None:
    for n in numbers:  # the iterator is shared: each number is taken by exactly one worker
        if time.monotonic() >= deadline:
            return
        out.attempted += 1
        phone = f"+7916{n:07d}"
        t0 = time.perf_counter()
        try:
            status, body = await http.request("POST", "/api/v1/auth/otp", {"phone": phone})
            t1 = time.perf_counter()
            if status != 202:
                out.errors.add(f"otp {status}", body.decode(errors="replace"))
                continue
            code = await inbox.code_for(phone)
            t2 = time.perf_counter()
            status, body = await http.request("POST", "/api/v1/auth/token", {"phone": phone, "code": code})
            t3 = time.perf_counter()
        except TRANSPORT_ERRORS as exc:
            out.errors.add(f"login {type(exc).__name__}", str(exc))
            continue
        if status != 200:
            out.errors.add(f"token {status}", body.decode(errors="replace"))
            continue
        try:
            out.tokens.append(msgspec.json.decode(body)["access_token"])
        except (msgspec.DecodeError, KeyError, TypeError):
            out.errors.add("token body", body.decode(errors="replace"))
            continue
        out.login.append(t3 - t0)
        out.otp.append(t1 - t0)
        out.token.append(t3 - t2)


async def scenario_login(clients: list[Http], inbox: SmsInbox, pids: Pids, logins: int,
                         max_seconds: float) -> tuple[LoginResults, dict[str, Any]]:
    base = random.randrange(0, 10**7 - logins)  # distinct phones, fresh on every run
    numbers = iter(range(base, base + logins))
    out = LoginResults()
    deadline = time.monotonic() + max_seconds
    before = CpuSnapshot.take(pids)
    await asyncio.gather(*(login_worker(c, inbox, numbers, deadline, out) for c in clients))
    after = CpuSnapshot.take(pids)
    usage = cpu_used(before, after)
    report: dict[str, Any] = {
        "requested": logins, "attempted": out.attempted, "ok": len(out.login),
        "timed_out": time.monotonic() >= deadline and out.attempted < logins,
        "logins_per_s": round(len(out.login) / usage["wall_s"], 1) if usage["wall_s"] else 0.0,
        **latency_summary(out.login),
        "otp_step": latency_summary(out.otp), "token_step": latency_summary(out.token),
        "errors": out.errors.total, "error_kinds": dict(out.errors.counts), "error_samples": out.errors.samples,
        **usage, **{f"server_{k}_mib": round(v, 1) for k, v in proc_memory_mib(pids.server).items()},
    }
    return out, report


# --- scenario B: GET /api/v1/me ---------------------------------------------------------------


@dataclass
class MeWindow:
    start: float = float("inf")
    end: float = float("inf")
    stop: bool = False
    latencies: list[float] = field(default_factory=list)
    statuses: Counter[int] = field(default_factory=Counter)
    errors: Errors = field(default_factory=Errors)  # anything but 200, warm-up included


async def me_worker(http: Http, token: str, w: MeWindow) -> None:
    while not w.stop:
        t0 = time.perf_counter()
        try:
            status, body = await http.request("GET", "/api/v1/me", token=token)
        except TRANSPORT_ERRORS as exc:
            w.errors.add(f"me {type(exc).__name__}", str(exc))
            await asyncio.sleep(0.01)  # do not spin on a dead server
            continue
        t1 = time.perf_counter()
        if status != 200:
            w.errors.add(f"me {status}", body.decode(errors="replace"))
        if w.start <= t1 <= w.end:  # counted by completion time inside the measured window
            w.statuses[status] += 1
            if status == 200:
                w.latencies.append(t1 - t0)


async def scenario_me(clients: list[Http], tokens: list[str], pids: Pids, warmup: float,
                      seconds: float) -> dict[str, Any]:
    w = MeWindow()
    workers = [asyncio.create_task(me_worker(c, tokens[i % len(tokens)], w)) for i, c in enumerate(clients)]
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
        "tokens_used": len(tokens), "requests": done,
        "requests_per_s": round(done / usage["wall_s"], 1) if usage["wall_s"] else 0.0,
        **latency_summary(w.latencies),
        "non_200": done - w.statuses.get(200, 0), "errors": w.errors.total,
        "error_kinds": dict(w.errors.counts), "error_samples": w.errors.samples,
        **usage, **{f"server_{k}_mib": round(v, 1) for k, v in proc_memory_mib(pids.server).items()},
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


def start_server(database_url: str, tmp: Path, port: int, extra: dict[str, str]) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "DATABASE_URL": database_url, "REDIS_URL": os.environ["TEST_REDIS_URL"],
        "S3_ENDPOINT_URL": os.environ["TEST_S3_ENDPOINT_URL"], "S3_ACCESS_KEY": os.environ["TEST_S3_ACCESS_KEY"],
        "S3_SECRET_KEY": os.environ["TEST_S3_SECRET_KEY"], "DATA_DIR": str(tmp / "data"), "HOST": HOST,
        "PORT": str(port), "LOG_REQUESTS": "false", "LOG_LEVEL": "WARNING",
        "OTP_PER_IP_PER_HOUR": "100000000", "SMS_BACKEND": "log", "SMS_LOG_PATH": str(tmp / "sms.log"),
        **extra,
    }
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


def print_table(result: dict[str, Any]) -> None:
    a, b, pids = result["login"], result["me"], result["pids"]
    rows: list[tuple[str, str, str]] = [
        ("", "A: OTP login", "B: GET /me"),
        ("operations ok", f"{a['ok']} of {a['requested']}", f"{b['requests']}"),
        ("throughput /s", f"{a['logins_per_s']}", f"{b['requests_per_s']}"),
        ("latency p50 ms", f"{a['p50_ms']}", f"{b['p50_ms']}"),
        ("latency p99 ms", f"{a['p99_ms']}", f"{b['p99_ms']}"),
        ("latency max ms", f"{a['max_ms']}", f"{b['max_ms']}"),
        ("errors / non-200", f"{a['errors']}", f"{b['errors']} / {b['non_200']} in window"),
        ("wall s", f"{a['wall_s']}", f"{b['wall_s']} (+{result['config']['warmup_s']} warm-up)"),
        ("server CPU s", f"{a['server_cpu_s']}", f"{b['server_cpu_s']}"),
        ("client CPU s", f"{a['client_cpu_s']}", f"{b['client_cpu_s']}"),
        ("postgres CPU s", known(a["postgres_cpu_s"], pids["postmaster"]),
         known(b["postgres_cpu_s"], pids["postmaster"])),
        ("redis CPU s", known(a["redis_cpu_s"], pids["redis"]), known(b["redis_cpu_s"], pids["redis"])),
        ("other CPU s (rest of box)", f"{a['other_cpu_s']}", f"{b['other_cpu_s']}"),
        ("machine busy %", f"{a['machine_busy_pct']}", f"{b['machine_busy_pct']}"),
        ("server RSS MiB (after)", f"{a['server_VmRSS_mib']}", f"{b['server_VmRSS_mib']}"),
        ("server peak RSS MiB", f"{a['server_VmHWM_mib']}", f"{b['server_VmHWM_mib']}"),
        ("db connections opened", f"{a['db_sessions_opened']}", f"{b['db_sessions_opened']} (incl. warm-up)"),
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    cfg = result["config"]
    print(f"\nclinic accounts benchmark: 1 server worker, {cfg['concurrency']} concurrent clients ({cfg['client']}"
          f" client, {cfg['loop']} loop), {cfg['cores']} cores; server ready in {result['server_ready_s']} s,"
          f" idle RSS {result['server_idle_rss_mib']} MiB"
          + (f"; server env {cfg['server_env']}" if cfg["server_env"] else ""))
    for i, row in enumerate(rows):
        print("  ".join(cell.ljust(widths[j]) if j == 0 else cell.rjust(widths[j]) for j, cell in enumerate(row)))
        if i == 0:
            print("  ".join("-" * w for w in widths))
    print(f"login steps: otp p50/p99 {a['otp_step']['p50_ms']}/{a['otp_step']['p99_ms']} ms, "
          f"token p50/p99 {a['token_step']['p50_ms']}/{a['token_step']['p99_ms']} ms")
    for name, part in (("A", a), ("B", b)):
        for sample in part["error_samples"]:
            print(f"{name} error: {sample}")
        if part["client_cpu_s"] >= 0.8 * part["server_cpu_s"]:
            print(f"note: in {name} the load generator used {part['client_cpu_s']} CPU s against the server's "
                  f"{part['server_cpu_s']}: the client competes for the cores and the figures understate the server")
    if a["timed_out"]:
        print(f"note: scenario A hit its time bound after {a['attempted']} logins")
    if not result["server_stopped_cleanly"]:
        print("note: the server did not stop cleanly on SIGTERM")
    for line in result["server_log"]:
        print(f"server log: {line}")


# --- main -------------------------------------------------------------------------------------


async def run(args: argparse.Namespace, tmp: Path, loop_name: str) -> tuple[dict[str, Any], bool]:
    postgres_url = os.environ["TEST_POSTGRES_URL"]
    t0 = time.monotonic()
    db_name, db_url = await create_database(postgres_url)
    port = free_port()
    proc = start_server(db_url, tmp, port, dict(args.server_env))
    inbox = SmsInbox(tmp / "sms.log")
    db = DbStats(postgres_url, db_name)
    try:
        ready_s = await wait_ready(proc, port, tmp / "server.log")
        setup_s = time.monotonic() - t0
        idle_rss = proc_memory_mib(proc.pid)["VmRSS"]
        redis_port = urlsplit(os.environ["TEST_REDIS_URL"]).port
        pids = Pids(server=proc.pid, postmaster=await db.postmaster_pid(),
                    redis=find_redis_pid(redis_port) if redis_port else None)
        async with http_clients(args.client, port, args.concurrency) as clients:
            s0 = await db.sessions()
            logins, report_a = await scenario_login(clients, inbox, pids, args.logins, args.login_seconds)
            s1 = await db.sessions()
            tokens = logins.tokens[: args.tokens]
            if not tokens:
                raise RuntimeError("no login succeeded: nothing to run scenario B with\n"
                                   + "\n".join(logins.errors.samples))
            report_b = await scenario_me(clients, tokens, pids, args.warmup, args.seconds)
            s2 = await db.sessions()
        report_a["db_sessions_opened"], report_b["db_sessions_opened"] = s1 - s0, s2 - s1
        if proc.poll() is not None:
            raise RuntimeError(f"server died during the run:\n{tail(tmp / 'server.log')}")
    finally:
        inbox.close()
        code = stop_server(proc)
        with contextlib.suppress(OSError, asyncpg.PostgresError):
            await drop_database(postgres_url, db_name)
    result = {
        "config": {"concurrency": args.concurrency, "logins": args.logins, "login_seconds": args.login_seconds,
                   "seconds": args.seconds, "warmup_s": args.warmup, "client": args.client, "loop": loop_name,
                   "cores": os.cpu_count(), "server_env": dict(args.server_env)},
        "setup_s": round(setup_s, 2), "server_ready_s": round(ready_s, 2),
        "server_stopped_cleanly": code in (0, -signal.SIGTERM),  # uvicorn re-raises the SIGTERM it handled
        "server_log": server_log_lines(tmp / "server.log"),
        "server_idle_rss_mib": round(idle_rss, 1), "pids": vars(pids), "login": report_a, "me": report_b,
    }
    failed = bool(report_a["errors"] or report_b["errors"] or report_b["non_200"])
    return result, failed


def env_pair(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name.isidentifier():
        raise argparse.ArgumentTypeError("expected NAME=VALUE")
    return name.upper(), value


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.accounts", description=__doc__.split("\n\n")[0])
    p.add_argument("--concurrency", type=int, default=50, help="concurrent clients (default 50)")
    p.add_argument("--logins", type=int, default=2000, help="logins in scenario A (default 2000)")
    p.add_argument("--login-seconds", type=float, default=45.0, help="time bound of scenario A (default 45)")
    p.add_argument("--seconds", type=float, default=10.0, help="measured time of scenario B (default 10)")
    p.add_argument("--warmup", type=float, default=2.0, help="warm-up of scenario B (default 2)")
    p.add_argument("--tokens", type=int, default=50, help="distinct access tokens used in B (default 50)")
    p.add_argument("--client", choices=("raw", "httpx"), default="raw",
                   help="raw: a minimal asyncio HTTP/1.1 keep-alive client (default); httpx: one AsyncClient")
    p.add_argument("--server-env", type=env_pair, action="append", default=[], metavar="NAME=VALUE",
                   help="extra server setting, e.g. DB_POOL_SIZE=50 (repeatable)")
    args = p.parse_args(argv)
    if not 1 <= args.concurrency <= 1000 or not 1 <= args.logins <= 1_000_000 or args.tokens < 1:
        p.error("--concurrency 1..1000, --logins 1..1000000, --tokens 1..")
    if not 0 < args.seconds <= 600 or not 0 <= args.warmup <= 60 or not 0 < args.login_seconds <= 600:
        p.error("--seconds 0..600, --warmup 0..60, --login-seconds 0..600")
    return args


def stop_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    missing = [v for v in ("TEST_POSTGRES_URL", "TEST_REDIS_URL", "TEST_S3_ENDPOINT_URL", "TEST_S3_ACCESS_KEY",
                           "TEST_S3_SECRET_KEY") if v not in os.environ]
    if missing:
        print(f"missing {', '.join(missing)}: run under `python -m tests.harness`", file=sys.stderr)
        return 2
    try:
        import uvloop
    except ImportError:
        uvloop = None  # type: ignore[assignment]
    signal.signal(signal.SIGTERM, stop_on_sigterm)  # so the finally blocks stop the server
    with tempfile.TemporaryDirectory(prefix="clinic-bench-") as tmp:
        coro = run(args, Path(tmp), "uvloop" if uvloop else "asyncio")
        result, failed = uvloop.run(coro) if uvloop else asyncio.run(coro)
    print_table(result)
    print(msgspec.json.encode(result).decode(), flush=True)
    if failed:
        print("FAILED: some requests failed unexpectedly (see errors above)", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
