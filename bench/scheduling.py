"""Load benchmark of scheduling and consultations against the real server on real backing services.

    python -m tests.harness python -m bench.scheduling [--concurrency 50] [--seconds 10] [--racers 200]

It makes a fresh PostgreSQL database, migrates it, starts `python -m app serve` (one worker), makes the first
admin with `python -m app create-admin`, and arranges everything else through the API, as the apps would:
two endocrinologists (POST /api/v1/staff), a service (POST /api/v1/services), their schedules
(PUT /api/v1/specialists/{id}/schedule) and patients signed in by one-time code. Then, from this process:

  A. the specialist's day calendar: GET /api/v1/consultations?from=D&to=D&tz=Europe/Moscow with the token of a
     doctor who has 40 consultations on day D (20-minute slots around the clock), N clients for a fixed time
     after a warm-up; every answer must list the 40;
  B. the booking race: 200 signed-in patients at once for the 50 slots of another doctor, each trying the slots
     in its own shuffled order (409 slot_taken: the next one) until it has one or has tried them all; exactly
     50 bookings must succeed, and the database must hold no slot booked twice;
  C. the partner slot feed GET /api/v1/slots/feed?specialty=endocrinology (public), N clients for a fixed time:
     200 with the body;
  D. the same with If-None-Match set to its ETag: 304.

Day D is the day after tomorrow in Europe/Moscow, and the calendar doctor works neither today nor tomorrow:
no slot starts during the run, so the feed (and its ETag) stays the same throughout.

It prints a table, then one JSON line; the exit status is 1 when a check failed (see `checks` in the JSON).
The client is the minimal raw HTTP/1.1 keep-alive client of bench.common, one connection per concurrent task.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import os
import random
import signal
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlencode, urlsplit
from zoneinfo import ZoneInfo

import asyncpg
import msgspec

from bench.common import (
    TRANSPORT_ERRORS,
    Check,
    CpuSnapshot,
    DbStats,
    Errors,
    HttpError,
    Pids,
    RawConnection,
    SmsInbox,
    cpu_used,
    create_admin,
    create_database,
    drop_database,
    env_pair,
    find_redis_pid,
    free_port,
    latency_summary,
    pg_dsn,
    proc_memory_mib,
    run_benchmark,
    server_log_lines,
    sign_in,
    start_server,
    stop_server,
    tail,
    text,
    timed,
    wait_ready,
)

TZ = "Europe/Moscow"
SPECIALTY = "endocrinology"
CALENDAR_SLOT_MINUTES = 20  # 72 slots a day
RACE_SLOT_MINUTES = 10
RACE_DAY_START = 8 * 60  # the race doctor's day starts at 08:00, so at most 96 ten-minute slots
T = TypeVar("T")


class PageHead(msgspec.Struct):
    """A list answer with its items left undecoded: counting them costs the load generator little."""

    items: list[msgspec.Raw]


class ErrorBody(msgspec.Struct):
    extra: dict[str, Any] = {}


def reason_of(body: bytes) -> str | None:
    try:
        reason = msgspec.json.decode(body, type=ErrorBody).extra.get("reason")
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None
    return reason if isinstance(reason, str) else None


@contextlib.asynccontextmanager
async def connections(port: int, count: int) -> AsyncIterator[list[RawConnection]]:
    conns = [RawConnection(port) for _ in range(count)]
    try:
        yield conns
    finally:
        for c in conns:
            await c.aclose()


async def in_parallel(clients: list[RawConnection], items: Iterable[T],
                      work: Callable[[RawConnection, T], Awaitable[Any]]) -> list[Any]:
    """Each item through `work` on one of the clients (one item at a time per client); results in item order."""
    queue = list(enumerate(items))
    results: list[Any] = [None] * len(queue)
    source = iter(queue)

    async def worker(http: RawConnection) -> None:
        for i, item in source:  # shared iterator: each item is taken by exactly one worker
            results[i] = await work(http, item)

    await asyncio.gather(*(worker(c) for c in clients))
    return results


async def call(http: RawConnection, method: str, path: str, body: Any = None, token: str | None = None,
               expect: int = 200) -> Any:
    """One setup request that must answer `expect`; the decoded JSON answer."""
    status, answer = await http.request(method, path, body, token=token)
    if status != expect:
        raise HttpError(f"{method} {path}: {status} (expected {expect}) {text(answer)}")
    return msgspec.json.decode(answer) if answer else None


# --- setup through the API --------------------------------------------------------------------


@dataclass
class Arranged:
    day: dt.date
    doctor_token: str  # the calendar doctor's
    calendar_doctor_id: str
    race_doctor_id: str
    service_id: str
    racer_tokens: list[str]
    race_slot_ids: list[str]
    calendar_visits: int
    calendar_slots_on_day: int
    logins_s: float
    seconds: float


async def arrange(args: argparse.Namespace, port: int, inbox: SmsInbox, admin_phone: str,
                  phones: Iterable[str]) -> Arranged:
    started = time.monotonic()
    today = dt.datetime.now(ZoneInfo(TZ)).date()
    day = today + dt.timedelta(days=2)
    off = {today.weekday(), (today + dt.timedelta(days=1)).weekday()}
    phone_list = list(phones)
    async with connections(port, args.concurrency) as pool:
        http = pool[0]
        admin = (await sign_in(http, inbox, admin_phone))["access_token"]
        staff = []
        for name, phone in (("Calendar Doctor", phone_list[0]), ("Race Doctor", phone_list[1])):
            staff.append(await call(http, "POST", "/api/v1/staff", {
                "phone": phone, "full_name": name, "role": "doctor", "specialties": [SPECIALTY]}, admin, 201))
        calendar_doctor, race_doctor = staff[0]["id"], staff[1]["id"]
        doctor_token = (await sign_in(http, inbox, phone_list[0]))["access_token"]
        service = await call(http, "POST", "/api/v1/services", {
            "specialty": SPECIALTY, "title": "Endocrinologist, first visit", "duration_minutes": 20,
            "price": "3000.00", "in_person_only": False, "stage": "first"}, admin, 201)
        await call(http, "PUT", f"/api/v1/specialists/{calendar_doctor}/schedule", {
            "timezone": TZ, "slot_minutes": CALENDAR_SLOT_MINUTES, "horizon_days": 14,
            "weekly": [{"weekday": d, "start": "00:00", "end": "24:00"} for d in range(7) if d not in off]}, admin)
        end = RACE_DAY_START + args.race_slots * RACE_SLOT_MINUTES
        await call(http, "PUT", f"/api/v1/specialists/{race_doctor}/schedule", {
            "timezone": TZ, "slot_minutes": RACE_SLOT_MINUTES, "horizon_days": 3,
            "weekly": [{"weekday": day.weekday(), "start": f"{RACE_DAY_START // 60:02d}:{RACE_DAY_START % 60:02d}",
                        "end": f"{end // 60:02d}:{end % 60:02d}"}]}, admin)

        t0 = time.monotonic()
        patients = phone_list[2:2 + args.calendar_visits + args.racers]
        tokens = [a["access_token"] for a in await in_parallel(pool, patients, lambda h, p: sign_in(h, inbox, p))]
        logins_s = time.monotonic() - t0
        calendar_tokens, racer_tokens = tokens[:args.calendar_visits], tokens[args.calendar_visits:]

        q = urlencode({"from": day.isoformat(), "to": day.isoformat(), "tz": TZ})
        on_day = (await call(http, "GET", f"/api/v1/specialists/{calendar_doctor}/slots?{q}", token=admin))["items"]
        if len(on_day) < args.calendar_visits:
            raise RuntimeError(f"the calendar doctor has {len(on_day)} free slots on {day}, "
                               f"fewer than {args.calendar_visits}")
        chosen = random.sample(on_day, args.calendar_visits)

        async def book(h: RawConnection, pair: tuple[str, dict[str, Any]]) -> Any:
            token, slot = pair
            return await call(h, "POST", "/api/v1/consultations", {
                "slot_id": slot["id"], "service_id": service["id"], "format": "in_person"}, token, 201)

        await in_parallel(pool, zip(calendar_tokens, chosen, strict=True), book)

        q = urlencode({"from": today.isoformat(), "to": (today + dt.timedelta(days=3)).isoformat(), "tz": TZ})
        race_slots = (await call(http, "GET", f"/api/v1/specialists/{race_doctor}/slots?{q}", token=admin))["items"]
        if len(race_slots) != args.race_slots:
            raise RuntimeError(f"the race doctor has {len(race_slots)} free slots, not {args.race_slots}")
    return Arranged(day=day, doctor_token=doctor_token, calendar_doctor_id=calendar_doctor,
                    race_doctor_id=race_doctor, service_id=service["id"], racer_tokens=racer_tokens,
                    race_slot_ids=[s["id"] for s in race_slots], calendar_visits=args.calendar_visits,
                    calendar_slots_on_day=len(on_day), logins_s=round(logins_s, 2),
                    seconds=round(time.monotonic() - started, 2))


# --- timed scenarios (A, C, D): N clients for a fixed time after a warm-up --------------------

def calendar_check(expected: int) -> Check:
    def check(http: RawConnection, status: int, body: bytes) -> str | None:
        if status != 200:
            return f"calendar {status}"
        try:
            count = len(msgspec.json.decode(body, type=PageHead).items)
        except (msgspec.DecodeError, msgspec.ValidationError):
            return "calendar body"
        return None if count == expected else f"calendar {count} items"

    return check


def feed_check(expected_status: int, etag: str, length: int) -> Check:
    def check(http: RawConnection, status: int, body: bytes) -> str | None:
        if status != expected_status:
            return f"feed {status}"
        if http.last_headers.get(b"etag", b"").decode() != etag:
            return "feed etag changed"
        if len(body) != (length if status == 200 else 0):
            return "feed body changed"
        return None

    return check


# --- B: the booking race ----------------------------------------------------------------------


@dataclass
class Race:
    start: float = 0.0
    posts: list[float] = field(default_factory=list)  # latency of every POST
    won: list[float] = field(default_factory=list)
    lost: list[float] = field(default_factory=list)  # 409 slot_taken
    winners: list[tuple[str, float]] = field(default_factory=list)  # (slot id, completion time)
    statuses: Counter[int] = field(default_factory=Counter)
    gave_up: int = 0  # racers that found every slot taken
    timed_out: int = 0
    errors: Errors = field(default_factory=Errors)


async def racer(http: RawConnection, token: str, order: list[str], service_id: str, go: asyncio.Event,
                deadline: float, race: Race) -> None:
    await go.wait()
    for slot_id in order:  # at most one POST per slot
        if time.monotonic() >= deadline:
            race.timed_out += 1
            return
        t0 = time.perf_counter()
        try:
            status, body = await http.request("POST", "/api/v1/consultations", {
                "slot_id": slot_id, "service_id": service_id, "format": "in_person"}, token=token)
        except TRANSPORT_ERRORS as exc:
            race.errors.add(f"book {type(exc).__name__}", str(exc))
            continue
        t1 = time.perf_counter()
        race.posts.append(t1 - t0)
        race.statuses[status] += 1
        if status == 201:
            race.won.append(t1 - t0)
            booked = msgspec.json.decode(body)
            if booked.get("slot_id") != slot_id:
                race.errors.add("book other slot", text(body))
            race.winners.append((slot_id, t1))
            return
        if status == 409 and reason_of(body) == "slot_taken":
            race.lost.append(t1 - t0)
            continue
        race.errors.add(f"book {status}", text(body))
    race.gave_up += 1


async def db_booking_check(dsn: str, race_doctor_id: str) -> dict[str, int]:
    """What the database says afterwards: slots booked twice (anywhere), the race doctor's bookings, and slots
    whose booking mark disagrees with the consultation that holds them."""
    conn = await asyncpg.connect(dsn)
    try:
        return {
            "double_bookings": int(await conn.fetchval(
                "SELECT count(*) FROM (SELECT slot_id FROM consultation GROUP BY slot_id HAVING count(*) > 1) d")),
            "race_consultations": int(await conn.fetchval(
                "SELECT count(*) FROM consultation WHERE specialist_id = $1", race_doctor_id)),
            "race_slots_booked": int(await conn.fetchval(
                "SELECT count(*) FROM slot WHERE specialist_id = $1 AND consultation_id IS NOT NULL",
                race_doctor_id)),
            "slot_marks_disagreeing": int(await conn.fetchval(
                "SELECT count(*) FROM consultation c JOIN slot s ON s.id = c.slot_id"
                " WHERE s.consultation_id IS DISTINCT FROM c.id")),
        }
    finally:
        await conn.close()


async def scenario_race(port: int, arranged: Arranged, pids: Pids, max_seconds: float,
                        dsn: str) -> dict[str, Any]:
    race = Race()
    go = asyncio.Event()
    async with connections(port, len(arranged.racer_tokens)) as clients:
        for c in clients:  # connected and warm before the start: the race measures booking, not TCP
            if (await c.request("GET", "/health/live"))[0] != 200:
                raise RuntimeError("GET /health/live failed before the race")
        deadline = time.monotonic() + max_seconds
        tasks = []
        for c, token in zip(clients, arranged.racer_tokens, strict=True):
            order = random.sample(arranged.race_slot_ids, len(arranged.race_slot_ids))
            tasks.append(asyncio.create_task(racer(c, token, order, arranged.service_id, go, deadline, race)))
        before = CpuSnapshot.take(pids)
        go.set()
        await asyncio.gather(*tasks)
        after = CpuSnapshot.take(pids)
    usage = cpu_used(before, after)
    db = await db_booking_check(dsn, arranged.race_doctor_id)
    won = len(race.winners)
    sold_out_s = round(max(t for _, t in race.winners) - before.wall, 2) if race.winners else None
    return {
        "racers": len(arranged.racer_tokens), "slots": len(arranged.race_slot_ids), "bookings_201": won,
        "distinct_slots_won": len({s for s, _ in race.winners}), "conflicts_409": len(race.lost),
        "posts": len(race.posts), "bookings_per_s": round(won / usage["wall_s"], 1) if usage["wall_s"] else 0.0,
        "posts_per_s": round(len(race.posts) / usage["wall_s"], 1) if usage["wall_s"] else 0.0,
        "sold_out_after_s": sold_out_s,
        "bookings_per_s_until_sold_out": round(won / sold_out_s, 1) if sold_out_s else 0.0,
        **latency_summary(race.posts),
        "won_step": latency_summary(race.won), "lost_step": latency_summary(race.lost),
        "statuses": {str(k): v for k, v in sorted(race.statuses.items())},
        "gave_up": race.gave_up, "timed_out": race.timed_out, **db,
        "errors": race.errors.total, "error_kinds": dict(race.errors.counts), "error_samples": race.errors.samples,
        **usage, **{f"server_{k}_mib": round(v, 1) for k, v in proc_memory_mib(pids.server).items()},
    }


# --- report -----------------------------------------------------------------------------------


def checks_of(result: dict[str, Any], args: argparse.Namespace) -> dict[str, bool]:
    a, b, c, d = result["calendar"], result["race"], result["feed"], result["feed_304"]
    return {
        "calendar: every answer 200 with all visits": a["requests"] > 0 and a["errors"] == 0,
        f"race: exactly {args.race_slots} bookings (201)": b["bookings_201"] == args.race_slots
        and b["distinct_slots_won"] == args.race_slots,
        "race: no double booking in the database": b["double_bookings"] == 0
        and b["slot_marks_disagreeing"] == 0 and b["race_consultations"] == args.race_slots
        and b["race_slots_booked"] == args.race_slots,
        "race: every loser got 409 slot_taken": b["errors"] == 0 and b["timed_out"] == 0
        and b["gave_up"] == b["racers"] - args.race_slots,
        "feed: every answer 200 with the same body and ETag": c["requests"] > 0 and c["errors"] == 0,
        "feed with If-None-Match: every answer 304": d["requests"] > 0 and d["errors"] == 0,
        "server stopped cleanly": result["server_stopped_cleanly"],
    }


def print_table(result: dict[str, Any]) -> None:
    a, b, c, d, cfg = result["calendar"], result["race"], result["feed"], result["feed_304"], result["config"]
    rows: list[tuple[str, ...]] = [
        ("", "A: day calendar", "B: booking race", "C: feed 200", "D: feed 304"),
        ("requests", f"{a['requests']}", f"{b['posts']} POSTs", f"{c['requests']}", f"{d['requests']}"),
        ("throughput /s", f"{a['requests_per_s']} req", f"{b['bookings_per_s']} bookings",
         f"{c['requests_per_s']} req", f"{d['requests_per_s']} req"),
        ("latency p50 ms", f"{a['p50_ms']}", f"{b['p50_ms']}", f"{c['p50_ms']}", f"{d['p50_ms']}"),
        ("latency p99 ms", f"{a['p99_ms']}", f"{b['p99_ms']}", f"{c['p99_ms']}", f"{d['p99_ms']}"),
        ("latency max ms", f"{a['max_ms']}", f"{b['max_ms']}", f"{c['max_ms']}", f"{d['max_ms']}"),
        ("errors", f"{a['errors']}", f"{b['errors']}", f"{c['errors']}", f"{d['errors']}"),
        ("wall s", f"{a['wall_s']}", f"{b['wall_s']}", f"{c['wall_s']}", f"{d['wall_s']}"),
        ("server CPU s", f"{a['server_cpu_s']}", f"{b['server_cpu_s']}", f"{c['server_cpu_s']}",
         f"{d['server_cpu_s']}"),
        ("client CPU s", f"{a['client_cpu_s']}", f"{b['client_cpu_s']}", f"{c['client_cpu_s']}",
         f"{d['client_cpu_s']}"),
        ("postgres CPU s", f"{a['postgres_cpu_s']}", f"{b['postgres_cpu_s']}", f"{c['postgres_cpu_s']}",
         f"{d['postgres_cpu_s']}"),
        ("other CPU s (rest of box)", f"{a['other_cpu_s']}", f"{b['other_cpu_s']}", f"{c['other_cpu_s']}",
         f"{d['other_cpu_s']}"),
        ("machine busy %", f"{a['machine_busy_pct']}", f"{b['machine_busy_pct']}", f"{c['machine_busy_pct']}",
         f"{d['machine_busy_pct']}"),
        ("server RSS MiB (after)", f"{a['server_VmRSS_mib']}", f"{b['server_VmRSS_mib']}",
         f"{c['server_VmRSS_mib']}", f"{d['server_VmRSS_mib']}"),
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    print(f"\nclinic scheduling benchmark: 1 server worker, {cfg['concurrency']} concurrent clients in A, C, D"
          f" ({cfg['warmup_s']} s warm-up + {cfg['seconds']} s), {b['racers']} racers for {b['slots']} slots in B"
          f" (raw client, {cfg['loop']} loop), {cfg['cores']} cores; setup {result['setup_s']} s"
          + (f"; server env {cfg['server_env']}" if cfg["server_env"] else ""))
    for i, row in enumerate(rows):
        print("  ".join(cell.ljust(widths[j]) if j == 0 else cell.rjust(widths[j]) for j, cell in enumerate(row)))
        if i == 0:
            print("  ".join("-" * w for w in widths))
    print(f"A: {result['arranged']['calendar_visits']} visits on {result['arranged']['day']} "
          f"(of {result['arranged']['calendar_slots_on_day']} slots that day) in every answer")
    print(f"B: {b['bookings_201']} of {b['slots']} slots booked (201), {b['conflicts_409']} answers 409 slot_taken, "
          f"sold out after {b['sold_out_after_s']} s ({b['bookings_per_s_until_sold_out']} bookings/s), all racers"
          f" done after {b['wall_s']} s ({b['posts_per_s']} POSTs/s); POST p50/p99 "
          f"201 {b['won_step']['p50_ms']}/{b['won_step']['p99_ms']} ms, "
          f"409 {b['lost_step']['p50_ms']}/{b['lost_step']['p99_ms']} ms; "
          f"double bookings in the database: {b['double_bookings']}")
    print(f"C/D: feed of {result['feed_items']} slots, {result['feed_bytes']} bytes, ETag {result['feed_etag']}")
    for name, part in (("A", a), ("B", b), ("C", c), ("D", d)):
        for sample in part["error_samples"]:
            print(f"{name} error: {sample}")
    for line in result["server_log"]:
        print(f"server log: {line}")
    for name, ok in result["checks"].items():
        print(f"{'ok  ' if ok else 'FAIL'} {name}")


# --- main -------------------------------------------------------------------------------------


async def run(args: argparse.Namespace, tmp: Path, loop_name: str) -> dict[str, Any]:
    postgres_url = os.environ["TEST_POSTGRES_URL"]
    t0 = time.monotonic()
    db_name, db_url = await create_database(postgres_url)
    port = free_port()
    extra = dict(args.server_env)
    proc = start_server(db_url, tmp, port, extra)
    inbox = SmsInbox(tmp / "sms.log")
    needed = 3 + args.calendar_visits + args.racers  # the admin, two doctors, the patients: fresh on every run
    base = random.randrange(0, 10**7 - needed)
    admin_phone, phones = f"+7917{base:07d}", [f"+7917{n:07d}" for n in range(base + 1, base + needed)]
    try:
        admin_made = asyncio.create_task(asyncio.to_thread(create_admin, db_url, tmp, port, extra, admin_phone))
        await wait_ready(proc, port, tmp / "server.log")
        await admin_made
        arranged = await arrange(args, port, inbox, admin_phone, phones)
        setup_s = time.monotonic() - t0
        redis_port = urlsplit(os.environ["TEST_REDIS_URL"]).port
        pids = Pids(server=proc.pid, postmaster=await DbStats(postgres_url, db_name).postmaster_pid(),
                    redis=find_redis_pid(redis_port) if redis_port else None)
        q = urlencode({"from": arranged.day.isoformat(), "to": arranged.day.isoformat(), "tz": TZ})
        async with connections(port, args.concurrency) as clients:
            calendar = await timed(clients, f"/api/v1/consultations?{q}", [arranged.doctor_token], None,
                                   calendar_check(arranged.calendar_visits), pids, args.warmup, args.seconds)
        race = await scenario_race(port, arranged, pids, args.race_seconds, pg_dsn(postgres_url, db_name))
        feed_path = f"/api/v1/slots/feed?specialty={SPECIALTY}"
        async with connections(port, args.concurrency) as clients:
            status, body = await clients[0].request("GET", feed_path)
            etag = clients[0].last_headers.get(b"etag", b"").decode()
            if status != 200 or not etag:
                raise RuntimeError(f"feed: {status}, ETag {etag!r}: {text(body)}")
            feed_items = len(msgspec.json.decode(body, type=PageHead).items)
            feed = await timed(clients, feed_path, [None], None, feed_check(200, etag, len(body)), pids,
                               args.warmup, args.seconds)
            feed_304 = await timed(clients, feed_path, [None], {"If-None-Match": etag}, feed_check(304, etag, 0),
                                   pids, args.warmup, args.seconds)
        if proc.poll() is not None:
            raise RuntimeError(f"server died during the run:\n{tail(tmp / 'server.log')}")
    finally:
        inbox.close()
        code = stop_server(proc)
        with contextlib.suppress(OSError, asyncpg.PostgresError):
            await drop_database(postgres_url, db_name)
    result: dict[str, Any] = {
        "config": {"concurrency": args.concurrency, "seconds": args.seconds, "warmup_s": args.warmup,
                   "racers": args.racers, "race_slots": args.race_slots, "calendar_visits": args.calendar_visits,
                   "race_seconds": args.race_seconds, "loop": loop_name, "cores": os.cpu_count(),
                   "server_env": extra},
        "setup_s": round(setup_s, 2), "server_stopped_cleanly": code in (0, -signal.SIGTERM),
        "server_log": server_log_lines(tmp / "server.log"), "pids": vars(pids),
        "arranged": {"day": arranged.day.isoformat(), "calendar_visits": arranged.calendar_visits,
                     "calendar_slots_on_day": arranged.calendar_slots_on_day, "patients_logins_s": arranged.logins_s,
                     "seconds": arranged.seconds},
        "calendar": calendar, "race": race, "feed": feed, "feed_304": feed_304,
        "feed_items": feed_items, "feed_bytes": len(body), "feed_etag": etag,
    }
    result["checks"] = checks_of(result, args)
    return result


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.scheduling", description=__doc__.split("\n\n")[0])
    p.add_argument("--concurrency", type=int, default=50, help="concurrent clients in A, C and D (default 50)")
    p.add_argument("--seconds", type=float, default=10.0, help="measured time of A, C and D (default 10)")
    p.add_argument("--warmup", type=float, default=2.0, help="warm-up before each of A, C and D (default 2)")
    p.add_argument("--calendar-visits", type=int, default=40, help="consultations on the doctor's day (default 40)")
    p.add_argument("--racers", type=int, default=200, help="patients racing in B (default 200)")
    p.add_argument("--race-slots", type=int, default=50, help="slots they race for (default 50, at most 96)")
    p.add_argument("--race-seconds", type=float, default=60.0, help="time bound of B (default 60)")
    p.add_argument("--server-env", type=env_pair, action="append", default=[], metavar="NAME=VALUE",
                   help="extra server setting, e.g. DB_POOL_SIZE=50 (repeatable)")
    args = p.parse_args(argv)
    if not 1 <= args.concurrency <= 1000 or not 1 <= args.racers <= 1000 or not 1 <= args.race_slots <= 96:
        p.error("--concurrency 1..1000, --racers 1..1000, --race-slots 1..96")
    if not 1 <= args.calendar_visits <= 72:
        p.error("--calendar-visits 1..72 (one day of 20-minute slots)")
    if not 0 < args.seconds <= 600 or not 0 <= args.warmup <= 60 or not 0 < args.race_seconds <= 600:
        p.error("--seconds 0..600, --warmup 0..60, --race-seconds 0..600")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    result = run_benchmark(lambda tmp, loop: run(args, tmp, loop))
    if result is None:
        return 2
    print_table(result)
    print(msgspec.json.encode(result).decode(), flush=True)
    failed = [name for name, ok in result["checks"].items() if not ok]
    if failed:
        print(f"FAILED: {'; '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
