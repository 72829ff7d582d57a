"""The hot reads against the framework's own floor: one table per profile with each route's ratio to the ceiling.

    python -m tests.harness python -m bench.reads [--profile pg|embedded|both] [--seconds 5] [--warmup 1]
                                                  [--concurrency 50] [--generators 1]

For each profile it starts `python -m app serve` (one worker) on a fresh database: PostgreSQL from the harness
(with its Redis and SeaweedFS), or embedded (a SQLite file in the temp dir, no Redis, local-disk documents).
The world is made through the API, as the apps would: an admin (`python -m app create-admin`), doctors
(POST /api/v1/staff), a service, schedules, patients signed in by one-time code, consultations booked by the
front desk (so they are confirmed and their chats open), chat messages and uploaded documents.

Then, route after route, load generator processes of their own (`--generators`, one by default; the server is
a child of this process, never of theirs) hold `--concurrency` keep-alive connections (the raw HTTP/1.1 client
of bench.common, one request at a time per connection) and GET the route in a loop: a warm-up, then what
completes inside `--seconds` is counted, with the CPU the server, the generators and PostgreSQL used meanwhile.
Every answer is checked (its status, and the item count, body length or id it must have): a fast wrong answer
counts as an error, never as a request.

The routes, in order: the ceiling GET /health/live (public, no database); the cheapest signed-in read
GET /api/v1/me/dependents; then the hot reads: a doctor's day calendar (40 consultations) and week calendar
(200), the free slots of one specialist for 14 days, the free slots across a direction (the slot feed of one
specialty for a week: the only slot search the API has), GET /api/v1/me, the chat list of a specialist with 40
and with 200 conversations and of a patient with 10, one conversation's history page (20 messages), a patient's
card and a patient's documents as their doctor. The goals (one worker, PostgreSQL, 50 clients): the signed-in
floor at >= 0.6 of the ceiling; every hot read at >= 2,500 req/s or >= 0.5 of the ceiling, whichever is lower,
with p99 under 50 ms. The embedded table shows the same goals for comparison.

On PostgreSQL it then serves the same database with WORKERS=2 and measures the day calendar and GET /me again,
beside the one-worker figures of the same run: the scale factor (goal >= 1.6) and the generators' CPU share,
which on a 2-core machine is taken from the cores the workers would use.

A table per profile, then one JSON line. The exit status is 1 only when an answer was wrong, a request failed
or the world could not be made; a missed speed goal is a figure, not a failure.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import multiprocessing
import os
import random
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urlsplit
from zoneinfo import ZoneInfo

import asyncpg
import httpx
import msgspec

from bench.common import (
    CLK_TCK,
    HOST,
    ROOT,
    DbStats,
    Errors,
    HttpError,
    RawConnection,
    SmsInbox,
    Window,
    create_database,
    drop_database,
    find_redis_pid,
    free_port,
    latency_summary,
    machine_busy_jiffies,
    missing_harness_variables,
    proc_cpu_seconds,
    server_env,
    server_log_lines,
    sign_in,
    stop_on_sigterm,
    stop_server,
    tail,
    text,
    tree_cpu_seconds,
    wait_ready,
    window_worker,
)
from bench.conditions import Conditions, describe
from bench.documents import jpeg_payload
from bench.scheduling import PageHead, in_parallel

TZ = "Europe/Moscow"
SPECIALTY = "endocrinology"
CEILING_PATH = "/health/live"
FLOOR_RATIO_GOAL = 0.6  # the cheapest signed-in read against the ceiling
HOT_RATIO_GOAL = 0.5
HOT_RPS_GOAL = 2500.0
P99_GOAL_MS = 50.0
SCALE_GOAL = 1.6  # WORKERS=2 over one worker
GENERATOR_SATURATED = 0.9  # a generator process this busy (of one core) may be what limits the figure
START_DELAY_S = 0.3  # for the generators to receive a job before its first request
DAY_VISITS, WEEK_VISITS, PATIENT_CHATS = 40, 200, 10
HISTORY_MESSAGES, HISTORY_PAGE, DOCUMENTS = 30, 20, 10
DOCTOR_MESSAGED_CHATS = 10  # of the day doctor's 40 rows, these have messages
SLOTS_DAYS, DIRECTION_DAYS = 14, 7
SCALED_ROUTES = ("day calendar (40)", "GET /me")
SETUP_RETRIES = 5


# --- goals, ratios and the table (pure) -------------------------------------------------------


@dataclass(frozen=True)
class Goal:
    text: str
    min_rps: float | None = None
    min_ratio: float | None = None
    max_p99_ms: float | None = None


def goal_for(kind: str, ceiling_rps: float) -> Goal:
    """The goal of a route of this kind ("ceiling", "floor" or "hot") against the ceiling measured in the run."""
    if kind == "ceiling":
        return Goal("ceiling")
    if kind == "floor":
        return Goal(f">= {FLOOR_RATIO_GOAL:g}x ceiling", min_ratio=FLOOR_RATIO_GOAL)
    if kind == "hot":
        need = min(HOT_RPS_GOAL, HOT_RATIO_GOAL * ceiling_rps)
        return Goal(f">= {need:,.0f}/s, p99 < {P99_GOAL_MS:g} ms", min_rps=need, max_p99_ms=P99_GOAL_MS)
    raise ValueError(f"unknown route kind {kind!r}")


def ratio_to(rps: float, ceiling_rps: float) -> float:
    return round(rps / ceiling_rps, 3) if ceiling_rps > 0 else 0.0


def goal_met(goal: Goal, rps: float, p99_ms: float, ratio: float) -> bool | None:
    """None for the ceiling itself (no goal); else whether every bound of the goal holds."""
    if goal.min_rps is None and goal.min_ratio is None and goal.max_p99_ms is None:
        return None
    return ((goal.min_rps is None or rps >= goal.min_rps)
            and (goal.min_ratio is None or ratio >= goal.min_ratio)
            and (goal.max_p99_ms is None or p99_ms < goal.max_p99_ms))


def judge(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each measured row with its ratio to the ceiling (the row of kind "ceiling"), its goal and whether it met
    it. A row whose answers were not all right meets no goal.

    Also `cpu_ratio`: the ceiling's server CPU per answer over the row's, the ratio a server with a core of its
    own would reach; on a busy machine it moves less than the req/s ratio."""
    top = next((r for r in rows if r["kind"] == "ceiling"), None)
    ceiling = top["requests_per_s"] if top else 0.0
    ceiling_cpu = top["server_cpu_ms_per_answer"] if top else 0.0
    judged = []
    for row in rows:
        goal = goal_for(row["kind"], ceiling)
        ratio = ratio_to(row["requests_per_s"], ceiling)
        met = goal_met(goal, row["requests_per_s"], row["p99_ms"], ratio)
        if met is not None and row["errors"]:
            met = False
        cpu = row["server_cpu_ms_per_answer"]
        judged.append({**row, "ratio": ratio, "cpu_ratio": round(ceiling_cpu / cpu, 3) if cpu > 0 else 0.0,
                       "goal": goal.text, "met": met})
    return judged


def per_answer_ms(cpu_s: float, answers: int) -> float:
    return round(1000 * cpu_s / answers, 3) if answers else 0.0


def share(cpu_s: float, wall_s: float) -> float:
    """CPU seconds over wall seconds: 1.0 is one core busy all the time."""
    return round(cpu_s / wall_s, 2) if wall_s > 0 else 0.0


def scale_factor(one_rps: float, two_rps: float) -> float:
    return round(two_rps / one_rps, 2) if one_rps > 0 else 0.0


def met_text(met: bool | None) -> str:
    return "-" if met is None else ("met" if met else "NOT MET")


def format_table(header: list[str], rows: list[list[str]]) -> list[str]:
    """Columns padded to their widest cell: the first left-aligned, the rest right-aligned; a rule under the
    header."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        return "  ".join(c.ljust(widths[i]) if i == 0 else c.rjust(widths[i]) for i, c in enumerate(cells)).rstrip()

    return [line(header), "  ".join("-" * w for w in widths), *(line(r) for r in rows)]


def route_table(rows: list[dict[str, Any]]) -> list[str]:
    header = ["route", "req/s", "p50 ms", "p99 ms", "server CPU ms/answer", "ratio to ceiling", "goal", "met",
              "CPU ratio", "db CPU ms/answer", "generator CPU", "errors"]
    return format_table(header, [
        [r["route"], f"{r['requests_per_s']:,.0f}", f"{r['p50_ms']:.2f}", f"{r['p99_ms']:.2f}",
         f"{r['server_cpu_ms_per_answer']:.3f}", f"{r['ratio']:.2f}", r["goal"], met_text(r["met"]),
         f"{r['cpu_ratio']:.2f}",
         f"{r['postgres_cpu_ms_per_answer']:.3f}" if r["postgres_measured"] else "n/a",
         f"{100 * r['generator_share']:.0f} %", str(r["errors"])]
        for r in rows])


def scaling_rows(one: list[dict[str, Any]], two: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The WORKERS=2 rows beside the one-worker rows of the same routes: the scale factor and the CPU shares."""
    by_route = {r["route"]: r for r in one}
    out = []
    for r2 in two:
        r1 = by_route[r2["route"]]
        factor = scale_factor(r1["requests_per_s"], r2["requests_per_s"])
        out.append({"route": r2["route"], "one_worker_rps": r1["requests_per_s"],
                    "two_workers_rps": r2["requests_per_s"],
                    "scale": factor, "met": factor >= SCALE_GOAL and not r1["errors"] and not r2["errors"],
                    "one_worker_p99_ms": r1["p99_ms"], "two_workers_p99_ms": r2["p99_ms"],
                    "generator_share_one": r1["generator_share"], "generator_share_two": r2["generator_share"],
                    "server_share_one": r1["server_share"], "server_share_two": r2["server_share"],
                    "machine_busy_pct_two": r2["machine_busy_pct"]})
    return out


def scaling_table(rows: list[dict[str, Any]]) -> list[str]:
    header = ["route", "1 worker req/s", "2 workers req/s", "scale", "goal", "met", "p99 ms 1w/2w",
              "server cores 1w/2w", "generator cores 1w/2w", "machine busy % 2w"]
    return format_table(header, [
        [r["route"], f"{r['one_worker_rps']:,.0f}", f"{r['two_workers_rps']:,.0f}", f"{r['scale']:.2f}x",
         f">= {SCALE_GOAL:g}x", met_text(r["met"]), f"{r['one_worker_p99_ms']:.1f}/{r['two_workers_p99_ms']:.1f}",
         f"{r['server_share_one']:.2f}/{r['server_share_two']:.2f}",
         f"{r['generator_share_one']:.2f}/{r['generator_share_two']:.2f}", f"{r['machine_busy_pct_two']:.0f}"]
        for r in rows])


# --- the load generators: processes of their own, one job (a route's window) at a time ----------


@dataclass(frozen=True)
class Expect:
    """What every answer of a route must be: its status, and where given its item count, body length or id."""

    status: int = 200
    items: int | None = None
    length: int | None = None
    ids: tuple[str, ...] | None = None  # the id each token's answer names (parallel to the route's tokens)


@dataclass(frozen=True)
class Route:
    name: str
    kind: str  # ceiling, floor or hot
    path: str
    tokens: tuple[str | None, ...]  # connection i uses tokens[i % len(tokens)]
    expect: Expect = Expect()


@dataclass(frozen=True)
class Job:
    port: int
    path: str
    tokens: tuple[str | None, ...]  # one per connection of this generator
    ids: tuple[str | None, ...]  # likewise
    expect: Expect
    start_at: float  # time.perf_counter() values: CLOCK_MONOTONIC, the same in every process
    window_start: float
    window_end: float


class IdHead(msgspec.Struct):
    id: str | None = None


PAGES = msgspec.json.Decoder(PageHead)
IDS = msgspec.json.Decoder(IdHead)


def answer_check(expect: Expect, expected_id: str | None) -> Any:
    def check(http: RawConnection, status: int, body: bytes) -> str | None:
        if status != expect.status:
            return f"status {status}"
        if expect.length is not None and len(body) != expect.length:
            return f"{len(body)} bytes, not {expect.length}"
        try:
            if expect.items is not None and (count := len(PAGES.decode(body).items)) != expect.items:
                return f"{count} items, not {expect.items}"
            if expected_id is not None and (found := IDS.decode(body).id) != expected_id:
                return f"id {found}, not {expected_id}"
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            return f"body: {exc}"
        return None

    return check


async def run_job(job: Job) -> dict[str, Any]:
    w = Window(start=job.window_start, end=job.window_end)
    conns = [RawConnection(job.port) for _ in job.tokens]
    await asyncio.sleep(max(0.0, job.start_at - time.perf_counter()))
    workers = [asyncio.create_task(window_worker(c, job.path, token, None, answer_check(job.expect, expected), w))
               for c, token, expected in zip(conns, job.tokens, job.ids, strict=True)]
    try:
        await asyncio.sleep(max(0.0, job.window_end - time.perf_counter()))
    finally:
        w.stop = True
        await asyncio.gather(*workers, return_exceptions=True)
        for c in conns:
            await c.aclose()
    return {"statuses": dict(w.statuses), "latencies": w.latencies, "wrong": w.wrong,
            "error_kinds": dict(w.errors.counts), "error_samples": w.errors.samples}


def generator_main(pipe: Connection) -> None:
    """A generator process: runs each job it is sent and sends back what it counted; None ends it."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when it ends
    try:
        import uvloop
        runner: Any = uvloop.run
    except ImportError:
        runner = asyncio.run
    while (job := pipe.recv()) is not None:
        pipe.send(runner(run_job(job)))


class Generators:
    def __init__(self, count: int) -> None:
        context = multiprocessing.get_context("spawn")  # a fresh interpreter: nothing of this event loop
        self.pipes: list[Connection] = []
        self.procs: list[Any] = []
        for _ in range(count):
            ours, theirs = context.Pipe()
            proc = context.Process(target=generator_main, args=(theirs,), daemon=True)
            proc.start()
            theirs.close()
            self.pipes.append(ours)
            self.procs.append(proc)

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def __len__(self) -> int:
        return len(self.procs)

    async def run(self, jobs: list[Job]) -> list[dict[str, Any]]:
        for pipe, job in zip(self.pipes, jobs, strict=True):
            pipe.send(job)
        return list(await asyncio.gather(*(asyncio.to_thread(pipe.recv) for pipe in self.pipes)))

    def close(self) -> None:
        for pipe in self.pipes:
            with contextlib.suppress(OSError):
                pipe.send(None)
        for proc in self.procs:
            proc.join(timeout=5)
            if proc.is_alive():
                proc.terminate()
                proc.join(timeout=5)


# --- measuring one route ----------------------------------------------------------------------


def connection_plan(route: Route, connections: int, generators: int) -> list[tuple[tuple[str | None, ...],
                                                                                  tuple[str | None, ...]]]:
    """The route's connections dealt out to the generators: per generator, the token of each of its connections
    and the id its answers must name. Connection i uses tokens[i % len(tokens)] whichever generator holds it."""
    tokens = [route.tokens[i % len(route.tokens)] for i in range(connections)]
    ids = route.expect.ids
    expected = [ids[i % len(ids)] if ids else None for i in range(connections)]
    return [(tuple(tokens[g::generators]), tuple(expected[g::generators])) for g in range(generators)]


@dataclass(frozen=True)
class Watched:
    server: int
    postmaster: int | None
    redis: int | None
    generators: tuple[int, ...]


def snapshot(w: Watched) -> dict[str, float]:
    busy, total = machine_busy_jiffies()
    return {"server": tree_cpu_seconds(w.server),  # uvicorn's worker processes are its children
            "client": sum(proc_cpu_seconds(pid) for pid in w.generators),
            "postgres": tree_cpu_seconds(w.postmaster) if w.postmaster else 0.0,
            "redis": proc_cpu_seconds(w.redis) if w.redis else 0.0,
            "busy": busy, "total": total, "wall": time.perf_counter()}


async def sleep_until(moment: float) -> None:
    await asyncio.sleep(max(0.0, moment - time.perf_counter()))


async def measure(route: Route, port: int, generators: Generators, watched: Watched,
                  args: argparse.Namespace) -> dict[str, Any]:
    start_at = time.perf_counter() + START_DELAY_S
    window_start = start_at + args.warmup
    window_end = window_start + args.seconds
    jobs = [Job(port=port, path=route.path, tokens=tokens, ids=ids, expect=route.expect, start_at=start_at,
                window_start=window_start, window_end=window_end)
            for tokens, ids in connection_plan(route, args.concurrency, len(generators))]
    results = asyncio.ensure_future(generators.run(jobs))
    await sleep_until(window_start)
    before = snapshot(watched)
    await sleep_until(window_end)
    after = snapshot(watched)
    parts = await results
    statuses: Counter[int] = Counter()
    errors = Errors()
    latencies: list[float] = []
    wrong = 0
    for part in parts:
        statuses.update(part["statuses"])
        latencies.extend(part["latencies"])
        wrong += part["wrong"]
        errors.counts.update(part["error_kinds"])
        errors.samples.extend(part["error_samples"][:5 - len(errors.samples)])
    wall = after["wall"] - before["wall"]
    used = {k: after[k] - before[k] for k in ("server", "client", "postgres", "redis")}
    right = len(latencies)  # answers inside the window that were right
    return {
        "route": route.name, "kind": route.kind, "path": route.path, "requests": right,
        "requests_per_s": round(right / wall, 1) if wall > 0 else 0.0, **latency_summary(latencies),
        "statuses": {str(k): v for k, v in sorted(statuses.items())}, "wrong_in_window": wrong,
        "errors": errors.total, "error_kinds": dict(errors.counts), "error_samples": errors.samples,
        "wall_s": round(wall, 2), **{f"{k}_cpu_s": round(v, 2) for k, v in used.items()},
        "server_cpu_ms_per_answer": per_answer_ms(used["server"], right),
        "postgres_cpu_ms_per_answer": per_answer_ms(used["postgres"], right),
        "postgres_measured": watched.postmaster is not None,
        "server_share": share(used["server"], wall), "generator_share": share(used["client"], wall),
        "machine_busy_pct": round(100 * (after["busy"] - before["busy"]) / max(1, after["total"] - before["total"]),
                                  1),
        "machine_busy_cpu_s": round((after["busy"] - before["busy"]) / CLK_TCK, 2),
    }


# --- the world, made through the API ----------------------------------------------------------


@dataclass
class World:
    day: dt.date
    patient_tokens: list[str]
    patient_ids: list[str]
    day_doctor_token: str
    week_doctor_token: str
    chat_patient_token: str
    slots_doctor_id: str
    free_slots: int
    feed_path: str
    feed_items: int
    feed_length: int
    history_conversation: str
    card_patient_id: str
    made: dict[str, Any] = field(default_factory=dict)


async def call(http: RawConnection, method: str, path: str, body: Any = None, token: str | None = None,
               expect: int = 200) -> Any:
    """One setup request that must answer `expect`; the decoded answer. A 503 `busy` (SQLite's write lock
    under the setup's parallel bookings) is tried again after a pause, as the apps do."""
    for attempt in range(SETUP_RETRIES + 1):
        status, answer = await http.request(method, path, body, token=token)
        if status != 503 or attempt == SETUP_RETRIES:
            break
        await asyncio.sleep(0.05 * 2 ** attempt)
    if status != expect:
        raise HttpError(f"{method} {path}: {status} (expected {expect}) {text(answer)}")
    return msgspec.json.decode(answer) if answer else None


def schedule(weekdays: list[int], start: str, end: str, slot_minutes: int, horizon_days: int) -> dict[str, Any]:
    return {"timezone": TZ, "slot_minutes": slot_minutes, "horizon_days": horizon_days,
            "weekly": [{"weekday": d, "start": start, "end": end} for d in weekdays]}


def day_query(start: dt.date, end: dt.date, **more: Any) -> str:
    return urlencode({"from": start.isoformat(), "to": end.isoformat(), "tz": TZ, **more})


async def upload(http: httpx.AsyncClient, token: str, patient_id: str, n: int) -> None:
    """One small JPEG for the patient through the direct upload (a multipart form)."""
    answer = await http.post("/api/v1/documents/upload", headers={"Authorization": f"Bearer {token}"},
                             data={"patient_id": patient_id, "kind": "referral"},
                             files={"file": (f"referral-{n}.jpg", jpeg_payload(2048), "image/jpeg")})
    if answer.status_code != 201:
        raise RuntimeError(f"upload: {answer.status_code} {answer.text[:300]}")


async def build_world(port: int, inbox: SmsInbox, admin_phone: str, phones: list[str], setup_clients: int,
                      patients: int) -> World:
    started = time.monotonic()
    today = dt.datetime.now(ZoneInfo(TZ)).date()
    day = today + dt.timedelta(days=2)
    # nobody works today or tomorrow: no slot starts during the run, so free-slot counts stay put
    working = [d for d in range(7) if d not in {today.weekday(), (today + dt.timedelta(days=1)).weekday()}]
    phone = iter(phones)
    async with contextlib.AsyncExitStack() as stack:
        pool = [RawConnection(port) for _ in range(setup_clients)]
        for c in pool:
            stack.push_async_callback(c.aclose)
        http = pool[0]
        admin = (await sign_in(http, inbox, admin_phone))["access_token"]
        names = ["Day Doctor", "Week Doctor", "Slots Doctor"] + [f"Chat Doctor {i}" for i in range(PATIENT_CHATS)]
        staff_phones = [next(phone) for _ in names]
        staff = [await call(http, "POST", "/api/v1/staff", {"phone": p, "full_name": name, "role": "doctor",
                                                              "specialties": [SPECIALTY]}, admin, 201)
                 for name, p in zip(names, staff_phones, strict=True)]
        day_doc, week_doc, slots_doc, chat_docs = staff[0]["id"], staff[1]["id"], staff[2]["id"], staff[3:]
        service = (await call(http, "POST", "/api/v1/services", {
            "specialty": SPECIALTY, "title": "Endocrinologist, first visit", "duration_minutes": 20,
            "price": "3000.00", "in_person_only": False, "stage": "first"}, admin, 201))["id"]
        plans = [(day_doc, schedule(working, "00:00", "24:00", 20, 3)),
                 (week_doc, schedule(working, "00:00", "24:00", 20, 2 + DIRECTION_DAYS)),
                 (slots_doc, schedule(working, "09:00", "18:00", 30, 2 + SLOTS_DAYS))]
        plans += [(d["id"], schedule([day.weekday()], "08:00", "18:00", 60, 3)) for d in chat_docs]
        for doctor, plan in plans:
            await call(http, "PUT", f"/api/v1/specialists/{doctor}/schedule", plan, admin)

        signed = await in_parallel(pool, [staff_phones[0], staff_phones[1]] + [next(phone) for _ in range(patients)],
                                   lambda h, p: sign_in(h, inbox, p))
        day_token, week_token = signed[0]["access_token"], signed[1]["access_token"]
        patient_tokens = [s["access_token"] for s in signed[2:]]
        patient_ids = [s["user"]["id"] for s in signed[2:]]
        chat_patient = patient_ids[0]

        async def free(doctor: str, start: dt.date, end: dt.date) -> list[dict[str, Any]]:
            items: list[dict[str, Any]] = (await call(
                http, "GET", f"/api/v1/specialists/{doctor}/slots?{day_query(start, end)}", token=admin))["items"]
            return items

        week_end = day + dt.timedelta(days=DIRECTION_DAYS - 1)
        day_slots, week_slots = await free(day_doc, day, day), await free(week_doc, day, week_end)
        if len(day_slots) < DAY_VISITS or len(week_slots) < WEEK_VISITS:
            raise RuntimeError(f"too few slots: {len(day_slots)} on {day} for the day doctor, "
                               f"{len(week_slots)} in the week for the week doctor")
        bookings: list[dict[str, Any]] = []
        for slot in random.sample(day_slots, DAY_VISITS) + random.sample(week_slots, WEEK_VISITS):
            n = len(bookings)
            bookings.append({"slot_id": slot["id"], "service_id": service, "format": "in_person",
                             "patient_phone": next(phone), "patient_name": f"Reads Patient {n}"})
        for i, doctor in enumerate(chat_docs):  # the chat patient sees each of them at another hour
            slot = (await free(doctor["id"], day, day))[i]
            bookings.append({"slot_id": slot["id"], "service_id": service, "format": "in_person",
                             "patient_id": chat_patient})
        visits = await in_parallel(pool, bookings, lambda h, b: call(h, "POST", "/api/v1/consultations", b, admin,
                                                                     201))
        day_visits, patient_visits = visits[:DAY_VISITS], visits[DAY_VISITS + WEEK_VISITS:]
        history = day_visits[0]["conversation_id"]

        async def say(h: RawConnection, item: tuple[str, str, int]) -> None:
            token, conversation, count = item
            for n in range(count):  # one conversation's messages in order
                await call(h, "POST", f"/api/v1/chats/{conversation}/messages",
                           {"client_id": secrets.token_hex(8), "text": f"message {n} of the reads benchmark"},
                           token, 201)

        talks = [(day_token, v["conversation_id"], HISTORY_MESSAGES if v["conversation_id"] == history else 1)
                 for v in day_visits[:DOCTOR_MESSAGED_CHATS]]
        talks += [(patient_tokens[0], v["conversation_id"], 1) for v in patient_visits]
        await in_parallel(pool, talks, say)

        card_patient = day_visits[0]["patient_id"]
        async with httpx.AsyncClient(base_url=f"http://{HOST}:{port}", timeout=60) as client:
            for n in range(DOCUMENTS):
                await upload(client, day_token, card_patient, n)

        slots_answer = await free(slots_doc, day, day + dt.timedelta(days=SLOTS_DAYS - 1))
        feed_query = urlencode({"specialty": SPECIALTY, "from": day.isoformat(), "to": week_end.isoformat()})
        feed_path = f"/api/v1/slots/feed?{feed_query}"
        status, feed = await http.request("GET", feed_path)
        if status != 200:
            raise RuntimeError(f"feed: {status} {text(feed)}")
    return World(day=day, patient_tokens=patient_tokens, patient_ids=patient_ids, day_doctor_token=day_token,
                 week_doctor_token=week_token, chat_patient_token=patient_tokens[0], slots_doctor_id=slots_doc,
                 free_slots=len(slots_answer), feed_path=feed_path, feed_items=len(PAGES.decode(feed).items),
                 feed_length=len(feed), history_conversation=history, card_patient_id=card_patient,
                 made={"doctors": len(staff), "signed_in_patients": patients, "consultations": len(visits),
                       "messages": sum(t[2] for t in talks), "documents": DOCUMENTS,
                       "free_slots_14_days": len(slots_answer), "feed_items": len(PAGES.decode(feed).items),
                       "feed_bytes": len(feed), "day": day.isoformat(),
                       "seconds": round(time.monotonic() - started, 1)})


def routes_of(w: World) -> list[Route]:
    week_end = w.day + dt.timedelta(days=DIRECTION_DAYS - 1)
    patients = tuple(w.patient_tokens)
    return [
        Route("GET /health/live (ceiling)", "ceiling", CEILING_PATH, (None,)),
        Route("GET /me/dependents (signed-in floor)", "floor", "/api/v1/me/dependents", patients, Expect(items=0)),
        Route("day calendar (40)", "hot", f"/api/v1/consultations?{day_query(w.day, w.day)}",
              (w.day_doctor_token,), Expect(items=DAY_VISITS)),
        Route("week calendar (200)", "hot", f"/api/v1/consultations?{day_query(w.day, week_end, limit=200)}",
              (w.week_doctor_token,), Expect(items=WEEK_VISITS)),
        Route(f"free slots, 1 specialist, {SLOTS_DAYS} days", "hot",
              f"/api/v1/specialists/{w.slots_doctor_id}/slots?"
              f"{day_query(w.day, w.day + dt.timedelta(days=SLOTS_DAYS - 1))}", patients, Expect(items=w.free_slots)),
        Route(f"free slots across a direction ({DIRECTION_DAYS} d feed)", "hot", w.feed_path, (None,),
              Expect(length=w.feed_length)),
        Route("GET /me", "hot", "/api/v1/me", patients, Expect(ids=tuple(w.patient_ids))),
        Route("chat list, specialist (40)", "hot", "/api/v1/chats", (w.day_doctor_token,), Expect(items=DAY_VISITS)),
        Route("chat list, specialist (200)", "hot", "/api/v1/chats", (w.week_doctor_token,),
              Expect(items=WEEK_VISITS)),
        Route("chat list, patient (10)", "hot", "/api/v1/chats", (w.chat_patient_token,),
              Expect(items=PATIENT_CHATS)),
        Route(f"history page ({HISTORY_PAGE} messages)", "hot",
              f"/api/v1/chats/{w.history_conversation}/messages?limit={HISTORY_PAGE}", (w.day_doctor_token,),
              Expect(items=HISTORY_PAGE)),
        Route("GET /patients/{id} (doctor)", "hot", f"/api/v1/patients/{w.card_patient_id}", (w.day_doctor_token,),
              Expect(ids=(w.card_patient_id,))),
        Route("GET /documents?patient_id= (doctor)", "hot", f"/api/v1/documents?patient_id={w.card_patient_id}",
              (w.day_doctor_token,), Expect(items=DOCUMENTS)),
    ]


# --- the profiles -----------------------------------------------------------------------------


def embedded_env(tmp: Path, port: int, extra: dict[str, str]) -> dict[str, str]:
    """The embedded profile: a SQLite file and local-disk documents under `tmp`, the in-process bus."""
    (tmp / "data").mkdir(exist_ok=True)
    env = {k: v for k, v in os.environ.items()
           if k not in ("DATABASE_URL", "REDIS_URL", "WORKERS") and not k.startswith("S3_")}
    return {**env, "DATA_DIR": str(tmp / "data"), "HOST": HOST, "PORT": str(port), "LOG_REQUESTS": "false",
            "LOG_LEVEL": "WARNING", "OTP_PER_IP_PER_HOUR": "100000000", "SMS_BACKEND": "log",
            "SMS_LOG_PATH": str(tmp / "sms.log"), **extra}


def launch(env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen([sys.executable, "-m", "app", "serve"], cwd=ROOT, env=env, stdout=out,
                                stderr=subprocess.STDOUT)


def make_admin(env: dict[str, str], phone: str) -> None:
    done = subprocess.run([sys.executable, "-m", "app", "create-admin", "--phone", phone, "--full-name", "Bench Admin"],
                          cwd=ROOT, env=env, capture_output=True, timeout=120)
    if done.returncode != 0:
        raise RuntimeError(f"create-admin failed ({done.returncode}): "
                           f"{(done.stdout + done.stderr).decode(errors='replace')[-2000:]}")


async def serve(env: dict[str, str], port: int, tmp: Path) -> subprocess.Popen[bytes]:
    proc = launch(env, tmp / "server.log")
    try:
        await wait_ready(proc, port, tmp / "server.log")
    except BaseException:
        stop_server(proc)
        raise
    return proc


async def measure_all(routes: list[Route], port: int, generators: Generators, watched: Watched,
                      args: argparse.Namespace, proc: subprocess.Popen[bytes], log: Path) -> list[dict[str, Any]]:
    rows = []
    for route in routes:
        if proc.poll() is not None:
            raise RuntimeError(f"server died during the run:\n{tail(log)}")
        row = await measure(route, port, generators, watched, args)
        print(f"  {route.name}: {row['requests_per_s']:,.0f} req/s, p99 {row['p99_ms']} ms, "
              f"errors {row['errors']}", file=sys.stderr, flush=True)
        rows.append(row)
    return rows


async def run_profile(profile: str, args: argparse.Namespace, generators: Generators) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix=f"clinic-reads-{profile}-") as tmp_name:
        tmp = Path(tmp_name)
        port = free_port()
        extra = {"JWT_KEYS": f"k1={secrets.token_urlsafe(36)}", "SECRET_KEY": secrets.token_urlsafe(36),
                 "CHAT_SENDS_PER_MINUTE": "1000000", **dict(args.server_env)}
        needed = 1 + 3 + PATIENT_CHATS + args.patients + DAY_VISITS + WEEK_VISITS
        base = random.randrange(0, 10**7 - needed)
        admin_phone, *phones = [f"+7915{n:07d}" for n in range(base, base + needed)]
        db_name = postgres_url = None
        postmaster = redis = None
        probe = Conditions.start()
        started = time.monotonic()
        if profile == "pg":
            postgres_url = os.environ["TEST_POSTGRES_URL"]
            db_name, db_url = await create_database(postgres_url)
            env = server_env(db_url, tmp, port, extra)
        else:
            env = embedded_env(tmp, port, extra)
        proc: subprocess.Popen[bytes] | None = None
        inbox = SmsInbox(tmp / "sms.log")
        rows: list[dict[str, Any]] = []
        scaled: list[dict[str, Any]] = []
        stopped = []
        try:
            if profile == "pg":
                assert postgres_url is not None
                assert db_name is not None
                admin_made = asyncio.create_task(asyncio.to_thread(make_admin, env, admin_phone))
                proc = await serve(env, port, tmp)
                await admin_made
                postmaster = await DbStats(postgres_url, db_name).postmaster_pid()
                redis_port = urlsplit(os.environ["TEST_REDIS_URL"]).port
                redis = find_redis_pid(redis_port) if redis_port else None
            else:  # SQLite: the schema first (create-admin migrates), then the server
                await asyncio.to_thread(make_admin, env, admin_phone)
                proc = await serve(env, port, tmp)
            # SQLite has one writer: parallel front-desk bookings of new callers only wait on its lock
            setup_clients = min(args.concurrency, 16) if profile == "pg" else 1
            world = await build_world(port, inbox, admin_phone, phones, setup_clients, args.patients)
            print(f"{profile}: world made in {world.made['seconds']} s: {world.made}", file=sys.stderr, flush=True)
            routes = routes_of(world)
            watched = Watched(proc.pid, postmaster, redis, tuple(generators.pids))
            rows = judge(await measure_all(routes, port, generators, watched, args, proc, tmp / "server.log"))
            if profile == "pg" and not args.no_scaling:
                stopped.append(stop_server(proc))
                proc = await serve({**env, "WORKERS": "2"}, port, tmp)
                watched = Watched(proc.pid, postmaster, redis, tuple(generators.pids))
                two = await measure_all([r for r in routes if r.name in SCALED_ROUTES], port, generators, watched,
                                        args, proc, tmp / "server.log")
                scaled = scaling_rows(rows, two)
                rows += [{**r, "route": f"{r['route']} [WORKERS=2]", "workers": 2} for r in two]
        except BaseException:
            print(f"{profile}: server log (tail):\n{tail(tmp / 'server.log', 40)}", file=sys.stderr, flush=True)
            raise
        finally:
            inbox.close()
            if proc is not None:
                stopped.append(stop_server(proc))
            if postgres_url is not None and db_name is not None:
                with contextlib.suppress(OSError, asyncpg.PostgresError):
                    await drop_database(postgres_url, db_name)
        conditions: dict[str, Any] = probe.finish()
        conditions_line = describe(conditions)
        return {"profile": profile, "world": world.made, "routes": rows, "scaling": scaled,
                "conditions": conditions, "conditions_line": conditions_line,
                "load_average": os.getloadavg(), "total_s": round(time.monotonic() - started, 1),
                "server_stopped_cleanly": all(code in (0, -signal.SIGTERM) for code in stopped),
                "server_log": server_log_lines(tmp / "server.log")}


# --- report -----------------------------------------------------------------------------------


PROFILE_TITLES = {"pg": "PostgreSQL + Redis + SeaweedFS", "embedded": "embedded (SQLite file, in-process bus)"}


def failures_of(result: dict[str, Any]) -> list[str]:
    """Wrong answers and failed requests (warm-up included), or a world or server that failed: the only things
    that fail the run."""
    if "failed" in result:
        return [f"{result['profile']}: {result['failed']}"]
    failed = [f"{result['profile']}: {r['route']}: {r['errors']} wrong answers or failed requests"
              for r in result["routes"] if r["errors"]]
    if not result["server_stopped_cleanly"]:
        failed.append(f"{result['profile']}: the server did not stop cleanly")
    return failed


def print_profile(result: dict[str, Any], args: argparse.Namespace, loop: str) -> None:
    one = [r for r in result["routes"] if r.get("workers", 1) == 1]
    w = result["world"]
    print(f"\nhot reads, {PROFILE_TITLES[result['profile']]}: 1 server worker, {args.concurrency} keep-alive "
          f"connections from {args.generators} generator process(es) ({loop}), {args.warmup:g} s warm-up + "
          f"{args.seconds:g} s per route, {os.cpu_count()} cores"
          + (f"; server env {dict(args.server_env)}" if args.server_env else ""))
    print(result["conditions_line"] or "conditions: load average after "
          + " ".join(f"{x:.2f}" for x in result["load_average"]))
    print(f"world: {w['consultations']} consultations, {w['messages']} messages, {w['documents']} documents, "
          f"{w['signed_in_patients']} signed-in patients (their tokens spread over the connections of the floor, "
          f"GET /me and free slots), {w['free_slots_14_days']} free slots in the 14 days, feed of "
          f"{w['feed_items']} slots ({w['feed_bytes']} bytes); day {w['day']}; made in {w['seconds']} s")
    for line in route_table(one):
        print(line)
    print("CPU ratio: the ceiling's server CPU per answer over the route's (what the ratio would be with a core "
          "to itself); generator CPU: the load generators' CPU over wall time (100 % = one core)")
    saturated = [r["route"] for r in one if r["generator_share"] >= GENERATOR_SATURATED * args.generators]
    if saturated:
        print(f"note: the load generator used >= {100 * GENERATOR_SATURATED:.0f} % of its core(s) on "
              f"{', '.join(saturated)}: there the figure may be the generator's limit, not the server's "
              f"(try --generators 2)")
    if result["scaling"]:
        print(f"\nWORKERS=2 against 1 worker, same database and run ({os.cpu_count()} cores; the generators' "
              f"cores are not the workers'):")
        for line in scaling_table(result["scaling"]):
            print(line)
    for r in result["routes"]:
        for sample in r["error_samples"]:
            print(f"error in {r['route']}: {sample}")
    for line in result["server_log"]:
        print(f"server log: {line}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    from bench.common import env_pair

    p = argparse.ArgumentParser(prog="python -m bench.reads", description=__doc__.split("\n\n")[0])
    p.add_argument("--profile", choices=["pg", "embedded", "both"], default="both",
                   help="PostgreSQL (under tests.harness), embedded (SQLite), or both (default)")
    p.add_argument("--concurrency", type=int, default=50, help="keep-alive connections in all (default 50)")
    p.add_argument("--seconds", type=float, default=5.0, help="measured time per route (default 5)")
    p.add_argument("--warmup", type=float, default=1.0, help="warm-up before each route (default 1)")
    p.add_argument("--generators", type=int, default=1,
                   help="load generator processes sharing the connections (default 1)")
    p.add_argument("--patients", type=int, default=50, help="signed-in patients whose tokens the patient routes "
                                                              "spread over (default 50)")
    p.add_argument("--no-scaling", action="store_true", help="skip the WORKERS=2 comparison")
    p.add_argument("--server-env", type=env_pair, action="append", default=[], metavar="NAME=VALUE",
                   help="extra server setting, e.g. DB_POOL_SIZE=20 (repeatable)")
    args = p.parse_args(argv)
    if not 1 <= args.concurrency <= 1000 or not 1 <= args.generators <= min(16, args.concurrency):
        p.error("--concurrency 1..1000, --generators 1..16 and at most --concurrency")
    if not 0 < args.seconds <= 600 or not 0 <= args.warmup <= 60 or not 1 <= args.patients <= 500:
        p.error("--seconds 0..600, --warmup 0..60, --patients 1..500")
    return args


SETUP_FAILURES = (RuntimeError, HttpError, OSError, TimeoutError, EOFError)  # the world or the server failed


async def run(args: argparse.Namespace, loop: str) -> list[dict[str, Any]]:
    """Each profile in turn, its table printed as soon as it is measured; a profile whose world or server
    failed is reported (with the server log's tail) and the next one still runs."""
    profiles = ["pg", "embedded"] if args.profile == "both" else [args.profile]
    generators = Generators(args.generators)
    results: list[dict[str, Any]] = []
    try:
        for profile in profiles:
            try:
                result = await run_profile(profile, args, generators)
            except SETUP_FAILURES as exc:
                print(f"FAILED: {profile}: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
                results.append({"profile": profile, "failed": f"{type(exc).__name__}: {exc}"})
                continue
            print_profile(result, args, loop)
            results.append(result)
    finally:
        generators.close()
    return results


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    missing = missing_harness_variables()
    if args.profile != "embedded" and missing:
        print(f"missing {', '.join(missing)}: run under `python -m tests.harness` (or --profile embedded)",
              file=sys.stderr)
        return 2
    try:
        import uvloop
    except ImportError:
        uvloop = None  # type: ignore[assignment]
    signal.signal(signal.SIGTERM, stop_on_sigterm)  # so the finally blocks stop the server
    started = time.monotonic()
    loop = "uvloop" if uvloop else "asyncio"
    results = uvloop.run(run(args, loop)) if uvloop else asyncio.run(run(args, loop))
    total = round(time.monotonic() - started, 1)
    print(f"total run time {total} s")
    print(msgspec.json.encode({"config": {**{k: v for k, v in vars(args).items() if k != "server_env"},
                                          "server_env": dict(args.server_env), "loop": loop,
                                          "cores": os.cpu_count()},
                               "profiles": results, "total_s": total}).decode(), flush=True)
    failed = [f for r in results for f in failures_of(r)]
    if failed:
        print(f"FAILED: {'; '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
