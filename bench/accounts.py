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
import signal
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import asyncpg
import msgspec

from bench.common import (
    TRANSPORT_ERRORS,
    CpuSnapshot,
    DbStats,
    Errors,
    Http,
    Pids,
    SmsInbox,
    cpu_used,
    create_database,
    drop_database,
    env_pair,
    find_redis_pid,
    free_port,
    http_clients,
    known,
    latency_summary,
    proc_memory_mib,
    run_benchmark,
    server_log_lines,
    start_server,
    status_is,
    stop_server,
    tail,
    timed,
    wait_ready,
)

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
        # both requests of a login (otp and token), from the server's CPU over the scenario
        "server_cpu_ms_per_login": round(1000 * usage["server_cpu_s"] / len(out.login), 2) if out.login else None,
        **latency_summary(out.login),
        "otp_step": latency_summary(out.otp), "token_step": latency_summary(out.token),
        "errors": out.errors.total, "error_kinds": dict(out.errors.counts), "error_samples": out.errors.samples,
        **usage, **{f"server_{k}_mib": round(v, 1) for k, v in proc_memory_mib(pids.server).items()},
    }
    return out, report


# --- scenario B: GET /api/v1/me ---------------------------------------------------------------


async def scenario_me(clients: list[Http], tokens: list[str], pids: Pids, warmup: float,
                      seconds: float) -> dict[str, Any]:
    report = await timed(clients, "/api/v1/me", tokens, None, status_is(200), pids, warmup, seconds)
    return {"tokens_used": len(tokens), **report}


def print_table(result: dict[str, Any]) -> None:
    a, b, pids = result["login"], result["me"], result["pids"]
    rows: list[tuple[str, str, str]] = [
        ("", "A: OTP login", "B: GET /me"),
        ("operations ok", f"{a['ok']} of {a['requested']}", f"{b['requests']}"),
        ("throughput /s", f"{a['logins_per_s']}", f"{b['requests_per_s']}"),
        ("latency p50 ms", f"{a['p50_ms']}", f"{b['p50_ms']}"),
        ("latency p99 ms", f"{a['p99_ms']}", f"{b['p99_ms']}"),
        ("latency max ms", f"{a['max_ms']}", f"{b['max_ms']}"),
        ("errors / non-200", f"{a['errors']}", f"{b['errors']} / {b['wrong_in_window']} in window"),
        ("wall s", f"{a['wall_s']}", f"{b['wall_s']} (+{result['config']['warmup_s']} warm-up)"),
        ("server CPU s", f"{a['server_cpu_s']}", f"{b['server_cpu_s']}"),
        ("server CPU ms per login / GET", f"{a['server_cpu_ms_per_login']}",
         f"{round(1000 * b['server_cpu_s'] / b['requests'], 2) if b['requests'] else None}"),
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
    failed = bool(report_a["errors"] or report_b["errors"] or report_b["wrong_in_window"])
    return result, failed


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


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    outcome = run_benchmark(lambda tmp, loop: run(args, tmp, loop))
    if outcome is None:
        return 2
    result, failed = outcome
    print_table(result)
    print(msgspec.json.encode(result).decode(), flush=True)
    if failed:
        print("FAILED: some requests failed unexpectedly (see errors above)", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
