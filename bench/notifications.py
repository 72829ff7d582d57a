"""The outbox worker: from a commit to its push arriving at FCM, and how fast one worker drains a backlog.

    python -m tests.harness python -m bench.notifications [--seconds 10] [--rates 100,1000] [--backlog 50000]
        [--fcm h2-tls|http1] [--workers 1]

A fresh PostgreSQL database with 1,000 patients, each with an Android device. One `python -m app worker` process
(or --workers of them) sends through the app's real FCM sender (firebase-admin) to the FCM stand-in of
tests/standins/fcm.py in a process of its own, noting when each push arrives: by default as Google serves FCM,
HTTP/2 over TLS with its self-signed certificate trusted through FCM_CA_FILE (--fcm http1: plain HTTP/1.1, one
connection per request in flight). This process commits outbox rows as the app does (outbox.stage, the
wake-up over Redis after the commit), at each rate for the given seconds, in commits every 10 ms (as a busy API's
requests would), and reports, per rate, p50/p99/max of commit-to-arrival. Then the worker is stopped, a backlog is
written, the worker started again, and the rows per second it drains are reported (first to last arrival).
One JSON line at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import secrets
import signal
import ssl
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import msgspec
from redis.asyncio import Redis

from app import outbox
from app.db import Database
from app.notifications.worker import RedisNudge
from app.settings import Settings
from bench.common import (
    ROOT,
    create_database,
    drop_database,
    latency_summary,
    pg_dsn,
    proc_cpu_seconds,
    run_benchmark,
    stop_server,
    tail,
)
from bench.conditions import Conditions, describe
from tests.standins.fcm import Answer, FcmStandin, Hold, Recorded

PROJECT = "bench-project"
TICK = 0.01  # commits every 10 ms


# --- the FCM stand-in (run as `python -m bench.notifications standin DIR [--plain]`) ---------------------


class ArrivalStandin(FcmStandin):
    """The tests' FCM stand-in keeping only when each push arrived (by collapse key), and answering
    `GET /arrivals?since=N` with those from the N-th on."""

    def __init__(self, directory: Path, tls: bool) -> None:
        super().__init__(PROJECT, tls=tls, directory=directory)
        self.arrivals: list[tuple[str, float]] = []

    def record(self, sent: Recorded) -> None:
        self.arrivals.append((sent.message["android"]["collapse_key"], time.time()))

    def route(self, method: str, path: str, headers: dict[str, str], raw: bytes,
              http_version: str) -> tuple[Answer, Hold | None]:
        if path == "/arrivals":
            with self._lock:
                fresh = self.arrivals[int(headers.get("x-since") or 0):]
            return (200, msgspec.json.encode(fresh)), None
        return super().route(method, path, headers, raw, http_version)


def serve_standin(directory: Path, tls: bool) -> None:
    standin = ArrivalStandin(directory, tls).start()
    standin.write_service_account(directory / "service-account.json")
    (directory / "standin.json").write_text(json.dumps({
        "url": standin.url, "token_url": standin.token_url, "ca_file": str(standin.ca_file or "")}))
    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    stopping.wait()
    standin.stop()


# --- the benchmark -------------------------------------------------------------------------------


async def people(dsn: str, count: int) -> list[uuid.UUID]:
    connection = await asyncpg.connect(dsn)
    try:
        ids = [uuid.uuid4() for _ in range(count)]
        now = dt.datetime.now(dt.UTC)
        await connection.executemany(
            "INSERT INTO user_account (id, full_name, timezone, roles, specialties, is_staff, active, questionnaire,"
            " created_at, updated_at) VALUES ($1, '', 'Europe/Moscow', '[\"patient\"]', '[]', false, true, '{}',"
            " $2, $2)", [(i, now) for i in ids])
        await connection.executemany(
            "INSERT INTO device (id, user_id, platform, push_token, push_token_hash, created_at, updated_at)"
            " VALUES ($1, $2, 'android', $3, $4, $5, $5)",
            [(uuid.uuid4(), i, f"token-{i.hex}", secrets.token_hex(32), now) for i in ids])
        return ids
    finally:
        await connection.close()


class Standin:
    """Where pushes arrive: the FCM stand-in (asked over HTTP), or the log file LogPush writes (no provider)."""

    def __init__(self, url: str, ca_file: str | None, log: Path | None = None) -> None:
        self.url = url
        self.log = log
        self.seen = 0
        self.arrived: dict[str, float] = {}
        self.client = httpx.AsyncClient(base_url=self.url, timeout=10,
                                        verify=ssl.create_default_context(cafile=ca_file) if ca_file else False)

    async def poll(self) -> int:
        if self.log is not None:
            return self._read_log()
        answer = await self.client.get("/arrivals", headers={"x-since": str(self.seen)})
        fresh = answer.json()
        self.seen += len(fresh)
        for key, at in fresh:
            self.arrived.setdefault(key, at)
        return len(fresh)

    def _read_log(self) -> int:
        assert self.log is not None
        if not self.log.exists():
            return 0
        with self.log.open("rb") as f:
            f.seek(self.seen)
            chunk = f.read()
        whole = chunk[:chunk.rfind(b"\n") + 1]
        self.seen += len(whole)
        lines = whole.splitlines()
        for line in lines:
            entry = json.loads(line)
            self.arrived.setdefault(entry["collapse_key"], dt.datetime.fromisoformat(entry["sent_at"]).timestamp())
        return len(lines)

    async def wait_for(self, keys: set[str], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not keys <= self.arrived.keys():
            if time.monotonic() > deadline:
                raise RuntimeError(f"{len(keys - self.arrived.keys())} pushes did not arrive within {timeout}s")
            await self.poll()
            await asyncio.sleep(0.1)


def start_worker(env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen([sys.executable, "-m", "app", "worker"], cwd=ROOT, env=env, stdout=out,
                                stderr=subprocess.STDOUT)


async def produce(database: Database, users: list[uuid.UUID], rate: int, seconds: float) -> dict[str, float]:
    """Commit `rate` rows a second for `seconds`, in a commit per tick; the commit time of each row's id."""
    committed: dict[str, float] = {}
    per_tick = max(1, round(rate * TICK))
    loop = asyncio.get_running_loop()
    ticks = int(seconds / TICK)
    start = loop.time()
    pending: set[asyncio.Task[None]] = set()

    async def commit(n: int) -> None:
        async with database.writer() as session:
            for k in range(per_tick):
                user = users[(n * per_tick + k) % len(users)]
                outbox.stage(session, "notice", uuid.uuid4(), [str(user)], {"kind": "conclusion_ready"})
            rows = list(session.new)  # their ids are set at the flush
            await session.commit()
            at = time.time()
        for row in rows:
            committed[row.id.hex] = at

    for n in range(ticks):
        delay = start + n * TICK - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        task = asyncio.create_task(commit(n))
        pending.add(task)
        task.add_done_callback(pending.discard)
    await asyncio.gather(*pending)
    return committed


async def backlog_rows(dsn: str, users: list[uuid.UUID], count: int) -> None:
    connection = await asyncpg.connect(dsn)
    try:
        now = dt.datetime.now(dt.UTC)
        await connection.copy_records_to_table(
            "outbox_event", columns=["id", "type", "aggregate_id", "recipients", "payload", "created_at", "updated_at",
                                     "next_attempt_at", "attempts"],
            records=[(uuid.uuid4(), "notice", uuid.uuid4(), json.dumps([str(users[i % len(users)])]),
                      '{"kind": "conclusion_ready"}', now, now, now, 0) for i in range(count)])
    finally:
        await connection.close()


async def start_standin(tmp: Path, tls: bool) -> tuple[subprocess.Popen[bytes], dict[str, str]]:
    """The FCM stand-in as a process of its own; where it listens, once it does."""
    directory = tmp / "standin"
    directory.mkdir()
    with (tmp / "standin.log").open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "bench.notifications", "standin", str(directory),
                                 *([] if tls else ["--plain"])], cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
    ready = directory / "standin.json"
    for _ in range(300):
        if ready.exists() and ready.read_text():
            return proc, {**json.loads(ready.read_text()), "credentials": str(directory / "service-account.json")}
        if proc.poll() is not None:
            break
        await asyncio.sleep(0.1)
    stop_server(proc)
    raise RuntimeError(f"the FCM stand-in did not start:\n{tail(tmp / 'standin.log')}")


async def run(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    postgres_url, redis_url = os.environ["TEST_POSTGRES_URL"], os.environ["TEST_REDIS_URL"]
    name, url = await create_database(postgres_url)
    dsn = pg_dsn(postgres_url, name)
    conditions = Conditions.start()  # before the stand-in and the workers start: the machine alone
    standin_proc, where = await start_standin(tmp, args.fcm == "h2-tls")
    fcm = Standin(where["token_url"], where["ca_file"] or None)
    base_env = {**os.environ, "DATABASE_URL": url, "REDIS_URL": redis_url, "LOG_LEVEL": "WARNING", **dict(args.env)}
    redis = Redis.from_url(redis_url)
    settings = Settings(database_url=url, redis_url=redis_url, data_dir=str(tmp / "data"),
                        jwt_keys=f"k1={secrets.token_urlsafe(36)}", secret_key=secrets.token_urlsafe(36))
    database = Database(settings)
    stop_nudging = outbox.on_commit(RedisNudge(redis))
    result: dict[str, Any] = {"standin": args.fcm, "workers": args.workers}
    try:
        users = await people(dsn, 1000)
        for sender in args.senders:
            if sender == "fcm":
                standin = fcm
                env = {**base_env, "DATA_DIR": str(tmp / "fcm"), "FCM_CREDENTIALS": where["credentials"],
                       "FCM_ENDPOINT": where["url"], **({"FCM_CA_FILE": where["ca_file"]} if where["ca_file"] else {})}
            else:  # no provider: LogPush, the worker's own cost
                standin = Standin(where["token_url"], None, tmp / "log" / "push.log")
                env = {**base_env, "DATA_DIR": str(tmp / "log")}
            print(f"sender {sender} ({args.fcm if sender == 'fcm' else 'log file'}, {args.workers} worker"
                  f"{'s' if args.workers > 1 else ''}):", flush=True)
            standin_pid = standin_proc.pid if sender == "fcm" else None
            result[sender] = await measure(args, env, tmp / f"worker-{sender}.log", standin, standin_pid, database,
                                           dsn, users)
    finally:
        stop_nudging()
        stop_server(standin_proc)
        await fcm.client.aclose()
        await database.dispose()
        await redis.aclose()
        await drop_database(postgres_url, name)
    result["conditions"] = conditions.finish()
    return result


def worker_cpu(workers: list[subprocess.Popen[bytes]]) -> float:
    return sum(proc_cpu_seconds(w.pid) for w in workers)


async def measure(args: argparse.Namespace, env: dict[str, str], worker_log: Path, standin: Standin,
                  standin_pid: int | None, database: Database, dsn: str, users: list[uuid.UUID]) -> dict[str, Any]:
    """Per rate and for the backlog: latency, the workers' CPU a push and the stand-in's (it shares the machine:
    when worker and stand-in together need more than the cores left, the rate is not the worker's own)."""
    result: dict[str, Any] = {"rates": []}

    def standin_cpu() -> float:
        return proc_cpu_seconds(standin_pid) if standin_pid is not None else 0.0

    def standin_text(ms: float) -> str:
        return f", stand-in {ms:.2f} ms" if standin_pid is not None else ""

    workers: list[subprocess.Popen[bytes]] = []
    try:
        workers = [start_worker(env, worker_log) for _ in range(args.workers)]
        warm = await produce(database, users, 50, 2.0)  # the workers start, connect, get their FCM token
        await standin.wait_for(set(warm), 90)
        for rate in args.rates:
            cpu, standin_before = worker_cpu(workers), standin_cpu()
            committed = await produce(database, users, rate, args.seconds)
            await standin.wait_for(set(committed), 120)
            cpu_ms = (worker_cpu(workers) - cpu) * 1000 / len(committed)
            standin_ms = (standin_cpu() - standin_before) * 1000 / len(committed)
            latencies = [standin.arrived[k] - t for k, t in committed.items()]
            summary = {"rate_per_s": rate, "events": len(committed), **latency_summary(latencies),
                       "worker_cpu_ms_per_push": round(cpu_ms, 3), "standin_cpu_ms_per_push": round(standin_ms, 3)}
            result["rates"].append(summary)
            print(f"{rate:>5} events/s: commit -> push p50 {summary['p50_ms']} ms, p99 {summary['p99_ms']} ms, "
                  f"max {summary['max_ms']} ms ({len(committed)} events; CPU a push: worker {cpu_ms:.2f} ms"
                  f"{standin_text(standin_ms)})", flush=True)
        for worker in workers:
            stop_server(worker)
        workers = []
        await backlog_rows(dsn, users, args.backlog)
        before = len(standin.arrived)
        workers = [start_worker(env, worker_log) for _ in range(args.workers)]
        deadline = time.monotonic() + 600
        cpu = standin_before = 0.0
        while len(standin.arrived) - before < args.backlog:
            if time.monotonic() > deadline or any(w.poll() is not None for w in workers):
                raise RuntimeError(f"backlog not drained:\n{tail(worker_log)}")
            if len(standin.arrived) == before:
                cpu, standin_before = worker_cpu(workers), standin_cpu()  # from the first arrival, not the start
            await standin.poll()
            await asyncio.sleep(0.2)
        cpu_ms = (worker_cpu(workers) - cpu) * 1000 / args.backlog
        standin_ms = (standin_cpu() - standin_before) * 1000 / args.backlog
        times = sorted(list(standin.arrived.values())[before:])
        drained = round(args.backlog / max(times[-1] - times[0], 1e-6))
        result["backlog"] = {"rows": args.backlog, "rows_per_s": drained, "seconds": round(times[-1] - times[0], 2),
                             "worker_cpu_ms_per_push": round(cpu_ms, 3),
                             "standin_cpu_ms_per_push": round(standin_ms, 3)}
        print(f"backlog of {args.backlog}: {drained} rows/s on {args.workers} worker{'s' if args.workers > 1 else ''}"
              f" ({times[-1] - times[0]:.1f} s; CPU a push: worker {cpu_ms:.2f} ms{standin_text(standin_ms)})",
              flush=True)
    finally:
        for worker in workers:
            stop_server(worker)
    return result


def rate_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError("expected numbers like 100,1000") from exc
    if not values or any(not 1 <= v <= 10_000 for v in values):
        raise argparse.ArgumentTypeError("each in [1, 10000]")
    return values


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["standin"]:
        serve_standin(Path(argv[1]), tls="--plain" not in argv)
        return 0
    p = argparse.ArgumentParser(prog="python -m bench.notifications", description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=10.0, help="measured seconds per rate (default 10)")
    p.add_argument("--rates", type=rate_list, default=[100, 1000], help="events per second (default 100,1000)")
    p.add_argument("--backlog", type=int, default=50_000, help="rows in the backlog (default 50000)")
    p.add_argument("--senders", type=lambda t: [v for v in t.split(",") if v in ("fcm", "log")], default=["fcm", "log"],
                   help="fcm (firebase-admin to the stand-in) and/or log (LogPush: the worker alone)")
    p.add_argument("--fcm", choices=["h2-tls", "http1"], default="h2-tls",
                   help="the FCM stand-in: HTTP/2 over TLS as Google serves it (default), or plain HTTP/1.1")
    p.add_argument("--workers", type=int, default=1, help="`python -m app worker` processes (default 1)")
    p.add_argument("--env", type=lambda t: tuple(t.split("=", 1)), action="append", default=[],
                   help="NAME=VALUE for the worker (e.g. OUTBOX_BATCH_SIZE=1000)")
    args = p.parse_args(argv)
    result = run_benchmark(lambda tmp, _loop: run(args, tmp))
    if result is None:
        return 2
    print(describe(result["conditions"]))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
