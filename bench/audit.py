"""What auditing staff reads costs the hot read paths: the same reads with the audit log on and off.

    python -m tests.harness python -m bench.audit [--concurrency 20] [--seconds 5] [--rounds 4]

It makes a fresh PostgreSQL database, migrates it, writes a patient (with a filled card), a doctor, a registrar,
their conversation and a page of messages in it straight into the database (asyncpg COPY), and mints their
access tokens with the server's own TokenIssuer and the JWT keys it hands the server. It starts two servers
(`python -m app serve`, one worker each) on that database, one with AUDIT_ENABLED=true and one with false, and
has them take turns under load, `--rounds` times per read (the order alternating, the idle one costing next to
nothing), so a drift of the shared machine falls on both sides alike. Each turn is N clients for a fixed time
after a warm-up, on:

  A. the doctor's read of the chat history: GET /api/v1/chats/{id}/messages (50 messages; audited: chat.read);
  B. the registrar's read of the patient card: GET /api/v1/patients/{id} (audited: card.read): the cheapest
     audited read, where the audit's share of the cost is the largest.

(The calendar, GET /api/v1/consultations, records nothing: auditing cannot slow it but by the writer task,
which these runs include.) Each audited request is one row: once both servers have stopped cleanly the table
must hold at least the audited requests counted (a clean stop writes the queue). It prints requests per second
and per-request CPU (the server's, and the server's plus PostgreSQL's, which takes the audit's COPYs) both
ways, and the throughput auditing costs; then one JSON line.

On a machine shared with other work the turns' throughputs swing by more than the audit could cost: `--control`
runs the same comparison with the audit off on both servers, and what it prints is the noise floor. So the
measure that decides is the audit's own work per read, timed in this process against the same database (the
request's context, the record, its share of the COPY; CPU time, plus PostgreSQL's for the COPYs): a single
worker is CPU-bound, and that share of a read's CPU bounds the throughput auditing takes. Exit status 1 when it
is over 10 % of a read's server CPU, a row is missing, or an answer was wrong.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import os
import random
import secrets
import signal
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import asyncpg
import msgspec
from litestar import Litestar, Request
from uuid_utils.compat import uuid7

from app.access import Role, Viewer
from app.accounts.tokens import TokenIssuer
from app.audit.service import AuditLog, audit_trail
from app.db import Database
from app.settings import Settings
from bench.common import (
    DbStats,
    Pids,
    RawConnection,
    create_database,
    drop_database,
    env_pair,
    find_redis_pid,
    free_port,
    pg_dsn,
    run_benchmark,
    server_log_lines,
    start_server,
    status_is,
    stop_server,
    tail,
    timed,
    tree_cpu_seconds,
    wait_ready,
)
from bench.conditions import Conditions, describe

MESSAGES = 50
MAX_LOSS_PCT = 10.0
SCENARIOS = ("chat_history", "card")


@dataclass(frozen=True)
class People:
    patient: uuid.UUID
    doctor: uuid.UUID
    registrar: uuid.UUID
    conversation: uuid.UUID


async def create_people(dsn: str) -> People:
    now = dt.datetime.now(dt.UTC)
    base = random.randrange(0, 10**7 - 3)
    people = People(uuid.uuid4(), uuid.uuid4(), uuid.uuid4(), uuid.uuid4())
    users = [(people.patient, f"+7916{base:07d}", "Bench Patient", '["patient"]', "[]", False,
              '{"allergies": "none", "cycle": "regular"}'),
             (people.doctor, f"+7916{base + 1:07d}", "Bench Doctor", '["doctor"]', '["endocrinology"]', True, "{}"),
             (people.registrar, f"+7916{base + 2:07d}", "Bench Registrar", '["registrar"]', "[]", True, "{}")]
    conn = await asyncpg.connect(dsn)
    try:
        async with conn.transaction():
            await conn.copy_records_to_table(
                "user_account",
                columns=["id", "phone", "full_name", "birth_date", "sex", "timezone", "roles", "specialties",
                         "is_staff", "questionnaire", "created_at", "updated_at"],
                records=[(u, phone, name, dt.date(1985, 4, 4), "female", "Europe/Moscow", roles, specialties,
                          staff, questionnaire, now, now)
                         for u, phone, name, roles, specialties, staff, questionnaire in users])
            await conn.copy_records_to_table(
                "conversation", columns=["id", "patient_id", "specialist_id", "created_at", "updated_at"],
                records=[(people.conversation, people.patient, people.doctor, now, now)])
            authors = (people.patient, people.doctor)
            await conn.copy_records_to_table(
                "message", columns=["id", "conversation_id", "author_id", "kind", "text", "document_ids",
                                    "client_id", "created_at", "updated_at"],
                records=[(uuid7(), people.conversation, authors[i % 2], "text",
                          f"message {i}: how are the readings this week?", "[]", secrets.token_hex(8), now, now)
                         for i in range(MESSAGES)])
    finally:
        await conn.close()
    return people


async def audit_rows(dsn: str) -> int:
    conn = await asyncpg.connect(dsn)
    try:
        return int(await conn.fetchval("SELECT count(*) FROM audit_event"))
    finally:
        await conn.close()


@contextlib.asynccontextmanager
async def connections(port: int, count: int) -> AsyncIterator[list[RawConnection]]:
    conns = [RawConnection(port) for _ in range(count)]
    try:
        yield conns
    finally:
        for c in conns:
            await c.aclose()


@dataclass
class Server:
    audited: bool
    port: int
    home: Path  # its settings' temp dir: data, SMS log, server.log
    proc: subprocess.Popen[bytes]
    pids: Pids | None = None

    @property
    def log(self) -> Path:
        return self.home / "server.log"


async def audit_own_cost(db_url: str, postmaster: int | None, reads: int, batch: int) -> dict[str, float]:
    """The audit's own work per read, in this process against the same database: the request's context, the
    record, and its share of the COPY (a flush every `batch` reads), with PostgreSQL's CPU for those COPYs. CPU
    time, not wall time: what the other tenants of the machine do barely moves it."""
    settings = Settings(database_url=db_url)
    database = Database(settings)
    audit = AuditLog(database, batch_rows=batch)
    app = Litestar(route_handlers=[])
    app.state.update(settings=settings, audit=audit)
    viewer = Viewer(id=uuid.uuid4(), roles=frozenset({Role.DOCTOR}))
    request: Request[Any, Any, Any] = Request({  # type: ignore[arg-type]
        "type": "http", "method": "GET", "path": "/", "raw_path": b"/", "query_string": b"", "root_path": "",
        "headers": [(b"host", b"clinic")], "client": ("10.0.0.7", 50123), "user": viewer, "app": app,
        "litestar_app": app, "state": {}, "path_params": {}})
    patient, conversation = uuid.uuid4(), uuid.uuid4()

    try:
        for _ in range(batch):  # warm: a pooled connection, COPY's first statement
            audit_trail(request).read("chat.read", "conversation", conversation, patient)
        await audit.flush()
        pg_before = tree_cpu_seconds(postmaster) if postmaster else 0.0
        started = time.process_time()
        for i in range(reads):
            audit_trail(request).read("chat.read", "conversation", conversation, patient)
            if (i + 1) % batch == 0:
                await audit.flush()
        await audit.flush()
        own = time.process_time() - started
        pg = (tree_cpu_seconds(postmaster) - pg_before) if postmaster else 0.0
    finally:
        await database.dispose()
    return {"reads": reads, "batch": batch, "server_cpu_us": round(1e6 * own / reads, 1),
            "postgres_cpu_us": round(1e6 * pg / reads, 1)}


async def run(args: argparse.Namespace, tmp: Path, loop_name: str) -> dict[str, Any]:
    postgres_url = os.environ["TEST_POSTGRES_URL"]
    t0 = time.monotonic()
    db_name, db_url = await create_database(postgres_url)
    dsn = pg_dsn(postgres_url, db_name)
    jwt_keys, secret_key = f"k1={secrets.token_urlsafe(36)}", secrets.token_urlsafe(36)
    extra = {"JWT_KEYS": jwt_keys, "SECRET_KEY": secret_key, "LOG_REQUESTS": "false", "LOG_LEVEL": "WARNING",
             **dict(args.server_env)}
    issuer = TokenIssuer(Settings(jwt_keys=jwt_keys, secret_key=secret_key, data_dir=str(tmp)))
    servers: list[Server] = []
    runs: dict[tuple[str, bool], list[dict[str, Any]]] = {(n, a): [] for n in SCENARIOS for a in (True, False)}
    codes: list[int] = []
    rows_before = 0
    try:
        people = await create_people(dsn)
        paths = {
            "chat_history": (f"/api/v1/chats/{people.conversation}/messages?limit={MESSAGES}",
                             issuer.issue_access(people.doctor, ["doctor"])),
            "card": (f"/api/v1/patients/{people.patient}", issuer.issue_access(people.registrar, ["registrar"])),
        }
        # both servers run at once and take turns under load (the idle one costs next to nothing), so a drift of
        # the shared machine falls on both sides alike
        for audited in (True, False):
            port, home = free_port(), tmp / ("audit-on" if audited else "audit-off")
            home.mkdir()
            servers.append(Server(audited, port, home, start_server(db_url, home, port, {
                **extra, "AUDIT_ENABLED": "true" if audited and not args.control else "false"})))
        db = DbStats(postgres_url, db_name)
        redis_port = urlsplit(os.environ["TEST_REDIS_URL"]).port
        redis_pid = find_redis_pid(redis_port) if redis_port else None
        for server in servers:
            await wait_ready(server.proc, server.port, server.log)
            server.pids = Pids(server=server.proc.pid, postmaster=await db.postmaster_pid(), redis=redis_pid)
        setup_s = time.monotonic() - t0
        own_cost = await audit_own_cost(db_url, servers[0].pids.postmaster if servers[0].pids else None,
                                        args.own_reads, 200)
        rows_before = await audit_rows(dsn)  # those of the in-process timing are not the servers'
        for name, (path, token) in paths.items():
            for round_ in range(args.rounds):
                for server in (servers if round_ % 2 == 0 else servers[::-1]):
                    assert server.pids is not None
                    async with connections(server.port, args.concurrency) as clients:
                        runs[(name, server.audited)].append(await timed(
                            clients, path, [token], None, status_is(200), server.pids, args.warmup, args.seconds))
                    if server.proc.poll() is not None:
                        raise RuntimeError(f"server died during the run:\n{tail(server.log)}")
            print(f"{name}: audit on " + ", ".join(str(r["requests_per_s"]) for r in runs[(name, True)])
                  + " req/s; off " + ", ".join(str(r["requests_per_s"]) for r in runs[(name, False)]) + " req/s",
                  file=sys.stderr, flush=True)
    finally:
        codes = [stop_server(server.proc) for server in servers]  # a clean stop writes the audit queue
        written = await audit_rows(dsn) - rows_before
        with contextlib.suppress(OSError, asyncpg.PostgresError):
            await drop_database(postgres_url, db_name)
    summary: dict[str, Any] = {}
    for name in SCENARIOS:
        side: dict[str, Any] = {}
        for audited, label in ((True, "audit_on"), (False, "audit_off")):
            done = runs[(name, audited)]
            requests, wall = sum(r["requests"] for r in done), sum(r["wall_s"] for r in done)
            server_cpu, pg_cpu = sum(r["server_cpu_s"] for r in done), sum(r["postgres_cpu_s"] for r in done)
            side[label] = {
                "requests": requests,
                "requests_per_s": round(requests / wall, 1),
                "requests_per_s_each": [r["requests_per_s"] for r in done],
                "p50_ms": round(statistics.median(r["p50_ms"] for r in done), 2),
                "p99_ms": round(statistics.median(r["p99_ms"] for r in done), 2),
                "server_cpu_us": round(1e6 * server_cpu / max(1, requests), 1),
                "server_and_postgres_cpu_us": round(1e6 * (server_cpu + pg_cpu) / max(1, requests), 1),
                "machine_busy_pct": round(statistics.mean(r["machine_busy_pct"] for r in done), 1),
                "errors": sum(r["errors"] + r["wrong_in_window"] for r in done),
            }
        on, off = side["audit_on"], side["audit_off"]
        side["throughput_loss_pct"] = round(100 * (1 - on["requests_per_s"] / off["requests_per_s"]), 1)
        side["audit_server_cpu_us_per_request"] = round(on["server_cpu_us"] - off["server_cpu_us"], 1)
        side["audit_server_and_postgres_cpu_us_per_request"] = round(
            on["server_and_postgres_cpu_us"] - off["server_and_postgres_cpu_us"], 1)
        side["audit_own_cpu_share_pct"] = round(100 * own_cost["server_cpu_us"] / off["server_cpu_us"], 1)
        summary[name] = side
    counted = sum(summary[n]["audit_on"]["requests"] for n in SCENARIOS)
    result: dict[str, Any] = {
        "config": {"concurrency": args.concurrency, "seconds": args.seconds, "warmup_s": args.warmup,
                   "rounds": args.rounds, "control": args.control, "messages": MESSAGES, "loop": loop_name,
                   "cores": os.cpu_count(),
                   "server_env": dict(args.server_env)},
        "setup_s": round(setup_s, 2), "summary": summary, "audit_own_cost": own_cost,
        "audit_rows": {"requests_counted_audited": counted, "rows_written": written},
        "runs": {f"{n}/{'on' if a else 'off'}": r for (n, a), r in runs.items()},
        "server_log": {s.home.name: server_log_lines(s.log) for s in servers},
    }
    result["checks"] = {
        # a single worker is CPU-bound: the audit's share of a read's CPU bounds the throughput it takes. The
        # turns' throughputs are printed too, but on a machine shared with other work they swing more than 10 %
        **{f"{name}: the audit's own CPU is at most {MAX_LOSS_PCT:g}% of the read's":
           summary[name]["audit_own_cpu_share_pct"] <= MAX_LOSS_PCT for name in SCENARIOS},
        # warm-ups are audited too, and only the audited server writes rows
        "every audited request counted has its row (a clean stop lost none)":
            written >= counted if not args.control else written == 0,
        "no wrong answer": all(summary[n][s]["errors"] == 0 for n in SCENARIOS for s in ("audit_on", "audit_off")),
        "both servers stopped cleanly": all(code in (0, -signal.SIGTERM) for code in codes),
    }
    return result


def print_table(result: dict[str, Any]) -> None:
    cfg, summary = result["config"], result["summary"]
    rows: list[tuple[str, ...]] = [("", "A: chat history (doctor)", "", "B: card (registrar)", "")]
    rows.append(("", "audit on", "audit off", "audit on", "audit off"))
    for label, key in (("req/s (mean)", "requests_per_s"), ("latency p50 ms", "p50_ms"),
                       ("latency p99 ms", "p99_ms"), ("server CPU us/req", "server_cpu_us"),
                       ("server+postgres CPU us/req", "server_and_postgres_cpu_us"), ("errors", "errors")):
        rows.append((label, *(str(summary[n][s][key]) for n in SCENARIOS for s in ("audit_on", "audit_off"))))
    rows.append(("throughput lost to audit %", str(summary["chat_history"]["throughput_loss_pct"]), "",
                 str(summary["card"]["throughput_loss_pct"]), ""))
    rows.append(("audit CPU us/req (server)", str(summary["chat_history"]["audit_server_cpu_us_per_request"]), "",
                 str(summary["card"]["audit_server_cpu_us_per_request"]), ""))
    rows.append(("audit CPU us/req (+postgres)",
                 str(summary["chat_history"]["audit_server_and_postgres_cpu_us_per_request"]), "",
                 str(summary["card"]["audit_server_and_postgres_cpu_us_per_request"]), ""))
    own = result["audit_own_cost"]
    rows.append(("audit's own CPU us/read", f"{own['server_cpu_us']} (+{own['postgres_cpu_us']} postgres)", "",
                 f"{own['server_cpu_us']} (+{own['postgres_cpu_us']} postgres)", ""))
    rows.append(("  as % of the read's CPU", str(summary["chat_history"]["audit_own_cpu_share_pct"]), "",
                 str(summary["card"]["audit_own_cpu_share_pct"]), ""))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    print(f"\nclinic audit benchmark: 2 servers of 1 worker (audit on, off) taking turns, {cfg['concurrency']} "
          f"concurrent clients, {cfg['rounds']} turn(s) of ({cfg['warmup_s']} s warm-up + {cfg['seconds']} s) per "
          f"read and setting (raw client, {cfg['loop']} loop), {cfg['cores']} cores; setup {result['setup_s']} s"
          + (f"; server env {cfg['server_env']}" if cfg["server_env"] else "")
          + ("\nCONTROL RUN: both servers with the audit off (the comparison's noise floor)" if cfg["control"] else ""))
    print(describe(result.get("conditions", {})))
    for i, row in enumerate(rows):
        print("  ".join(cell.ljust(widths[j]) for j, cell in enumerate(row)))
        if i == 1:
            print("  ".join("-" * w for w in widths))
    rows_info = result["audit_rows"]
    print(f"audit rows: {rows_info['rows_written']} written for {rows_info['requests_counted_audited']} audited "
          "requests counted in the windows (warm-ups are audited too)")
    for name, ok in result["checks"].items():
        print(f"[{'ok' if ok else 'FAILED'}] {name}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.audit", description=__doc__.split("\n\n")[0])
    p.add_argument("--concurrency", type=int, default=20, help="concurrent clients (default 20)")
    p.add_argument("--seconds", type=float, default=5.0, help="measured time of each turn (default 5)")
    p.add_argument("--warmup", type=float, default=1.0, help="warm-up before each turn (default 1)")
    p.add_argument("--rounds", type=int, default=4, help="turns of each server per read (default 4)")
    p.add_argument("--own-reads", type=int, default=20000,
                   help="reads audited in this process to time the audit's own work (default 20000)")
    p.add_argument("--control", action="store_true",
                   help="run the 'audit on' server with the audit off too: the noise floor of the comparison")
    p.add_argument("--server-env", type=env_pair, action="append", default=[], metavar="NAME=VALUE",
                   help="extra server setting, e.g. AUDIT_FLUSH_SECONDS=0.05 (repeatable)")
    args = p.parse_args(argv)
    if not 1 <= args.concurrency <= 1000 or not 1 <= args.rounds <= 20:
        p.error("--concurrency 1..1000, --rounds 1..20")
    if not 0 < args.seconds <= 600 or not 0 <= args.warmup <= 60:
        p.error("--seconds 0..600, --warmup 0..60")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    conditions = Conditions.start()
    result = run_benchmark(lambda tmp, loop: run(args, tmp, loop))
    if result is None:
        return 2
    result["conditions"] = conditions.finish()
    print_table(result)
    print(msgspec.json.encode(result).decode(), flush=True)
    failed = [name for name, ok in result["checks"].items() if not ok]
    if failed:
        print(f"FAILED: {'; '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
