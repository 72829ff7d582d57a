"""Load benchmark of chat delivery: POST a message, time it until the other side's WebSocket hears it.

    python -m tests.harness python -m bench.chat [--clients 1000] [--rates 100,500,1000] [--seconds 15]
    ... bench.chat --pin --clients 100 --rates 200,500,750          # the one-core setup: 50 pairs
    ... bench.chat --clients 10000 --chatting 0.01 --sweep 2500,5000,10000 --rates 100   # many sockets

It makes a fresh PostgreSQL database, migrates it, writes N/2 patients, N/2 endocrinologists, one
conversation per patient-doctor pair and an open chat window for each straight into the database (asyncpg
COPY), mints their access tokens with the server's own TokenIssuer and the JWT keys it hands the server, and
starts `python -m app serve` (one worker; WORKERS=2 through --server-env) as a child process. This process is
the load generator:

  - N WebSocket clients (`websockets`, one per user) on /api/v1/ws, each pinging every --ping-interval
    seconds (10); one the server drops reconnects and resumes from the last frame id it saw, as the apps do
    (at most 3 times). With --sweep they open in steps, the server's RSS (and MiB per 1000 sockets over its
    idle RSS) printed after each;
  - --chatting F: only the first F of the pairs send; the others only hold their sockets and ping;
  - for each rate R: a warm-up, then a fixed time in which messages go out on a fixed timetable of R per
    second (open loop: a slow server does not slow the timetable; a send that starts more than 10 ms after
    its slot is counted late), alternately from the patient and the doctor of a random pair, each a
    POST /api/v1/chats/{id}/messages over a pool of raw keep-alive HTTP connections;
  - delivery latency: from just before the POST is written to the moment the other side's socket receives
    the `message.new` frame with that client_id; also from the send's slot in the timetable (which adds any
    wait for a free connection), and the POST's own latency;
  - after each rate, up to 10 s for stragglers; a message answered 201 that the other side (or the author's
    own socket, which hears its messages too) never received is lost; one received twice is a duplicate;
    frame ids (the recipient's stream positions) must come 1, 2, 3 ... on every socket.

This process collects its garbage between rates, never during one: a collector pause here would hold back
the timestamps of frames already received and read as server latency.

--pin puts the server (every thread and worker), PostgreSQL (the postmaster and its backends) and Redis on
core 0 and this process on core 1, and puts them back on every core afterwards. This process's open-file
limit is raised to its hard limit, and the server child starts with the same (the app's defaults are not
touched).

Per rate it reports messages sent, POST errors, delivered, lost, duplicates, latencies, the generator's own
lateness against its timetable (p50/p99: a late generator under-loads the server), the CPU seconds of the
server, this load generator, PostgreSQL and Redis, steal and iowait, and the server's RSS; then the highest
rate whose delivery p99 stayed under 50 ms (with nothing lost, no POST error and at most 1% of sends late). Its
heading says the conditions (bench/conditions.py): a fixed CPU-speed probe before and after the run, steal
and iowait over it, the load average, the cores. A table, then one JSON line. Exit status 1 when anything was
lost or duplicated, a frame id came out of order, or the server dropped a socket. Sockets open with a bounded
concurrency, each answering a first ping before the next ones start (see connect_all).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import gc
import itertools
import math
import os
import random
import re
import resource
import secrets
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import asyncpg
import msgspec
import websockets
from websockets.asyncio.client import ClientConnection

from app.accounts.tokens import TokenIssuer
from app.settings import Settings
from bench.common import (
    HOST,
    ROOT,
    TRANSPORT_ERRORS,
    CpuSnapshot,
    DbStats,
    Errors,
    Pids,
    RawConnection,
    cpu_used,
    create_database,
    drop_database,
    env_pair,
    find_redis_pid,
    free_port,
    known,
    latency_summary,
    parent_pid,
    pg_dsn,
    proc_cpu_seconds,
    proc_memory_mib,
    run_benchmark,
    server_env,
    stop_server,
    tail,
    wait_ready,
)
from bench.conditions import Conditions, CpuTimes, Lateness, cpu_shares, describe

LATE_S = 0.010  # a send starting later than this after its slot in the timetable is late
STRAGGLER_S = 10.0  # how long after a rate's run a 201 message may still arrive before it counts as lost
POST_DRAIN_S = 15.0  # how long after a rate's run sends still waiting or in flight may take; then abandoned
PING_INTERVAL_S = 10.0  # the default; --ping-interval
SERVER_CORE, GENERATOR_CORE = 0, 1  # --pin: the server, PostgreSQL and Redis on one core, this process on the other
MAX_RECONNECTS = 3  # per socket, after the server dropped it
OPEN_ATTEMPTS = 3  # per socket, for its first connect
P99_GOAL_MS = 50.0
PING = '{"type":"ping"}'
UUID_TEXT = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


class Frame(msgspec.Struct):
    type: str
    id: str | None = None
    data: msgspec.Raw = msgspec.field(default_factory=lambda: msgspec.Raw(b"null"))


class MessageData(msgspec.Struct):
    id: str
    client_id: str


FRAMES = msgspec.json.Decoder(Frame)
MESSAGES = msgspec.json.Decoder(MessageData)


# --- the people and their conversations, straight into the database --------------------------


@dataclass
class People:
    ids: list[uuid.UUID]  # patients 0..P-1, then their doctors P..2P-1: pair k is (k, P+k)
    roles: list[list[str]]
    conversations: list[uuid.UUID]  # conversation k belongs to pair k

    @property
    def pairs(self) -> int:
        return len(self.conversations)


async def create_people(dsn: str, pairs: int) -> People:
    now = dt.datetime.now(dt.UTC)
    base = random.randrange(0, 10**7 - pairs)
    patients = [uuid.uuid4() for _ in range(pairs)]
    doctors = [uuid.uuid4() for _ in range(pairs)]
    users = [(u, f"+7916{base + i:07d}", f"Bench Patient {i}", '["patient"]', "[]", False)
             for i, u in enumerate(patients)]
    users += [(u, f"+7917{base + i:07d}", f"Bench Doctor {i}", '["doctor"]', '["endocrinology"]', True)
              for i, u in enumerate(doctors)]
    conversations = [uuid.uuid4() for _ in range(pairs)]
    conn = await asyncpg.connect(dsn)
    try:
        async with conn.transaction():
            await conn.copy_records_to_table(
                "user_account",
                columns=["id", "phone", "full_name", "timezone", "roles", "specialties", "is_staff",
                         "questionnaire", "created_at", "updated_at"],
                records=[(u, phone, name, "Europe/Moscow", roles, specialties, staff, "{}", now, now)
                         for u, phone, name, roles, specialties, staff in users])
            await conn.copy_records_to_table(
                "conversation", columns=["id", "patient_id", "specialist_id", "created_at", "updated_at"],
                records=[(c, p, d, now, now) for c, p, d in zip(conversations, patients, doctors, strict=True)])
            await conn.copy_records_to_table(
                "chat_window",
                columns=["id", "conversation_id", "consultation_id", "ends_at", "created_at", "updated_at"],
                records=[(uuid.uuid4(), c, uuid.uuid4(), now + dt.timedelta(days=1), now, now)
                         for c in conversations])
    finally:
        await conn.close()
    return People(ids=patients + doctors, roles=[["patient"]] * pairs + [["doctor"]] * pairs,
                  conversations=conversations)


# --- what was sent and what came back --------------------------------------------------------


@dataclass
class Phase:
    name: str
    rate: float
    measured: bool
    scheduled: int = 0  # sends the timetable asked for
    started: int = 0  # POSTs written
    late: int = 0
    max_lateness: float = 0.0
    lateness: Lateness = field(default_factory=Lateness)  # the generator's own: slot -> its send task running
    abandoned: int = 0  # never started, or still unanswered, when the drain time ran out
    statuses: Counter[int] = field(default_factory=Counter)
    errors: Errors = field(default_factory=Errors)
    records: list[Sent] = field(default_factory=list)
    started_at: float = 0.0
    schedule_end: float = 0.0


@dataclass(slots=True)
class Sent:
    phase: Phase
    author: int
    recipient: int
    scheduled: float
    written: float = 0.0
    answered: float = 0.0
    status: int = 0
    delivered: float = 0.0  # when the recipient's socket heard it
    echoed: float = 0.0  # when the author's own socket heard it
    duplicates: int = 0


@dataclass
class Sockets:
    """The frames every socket hears, checked as they come."""

    records: dict[str, Sent] = field(default_factory=dict)  # by client_id
    connections: list[ClientConnection | None] = field(default_factory=list)  # by user; None: never opened
    pongs: int = 0
    ponged: set[int] = field(default_factory=set)  # users whose socket answered a ping
    awaiting: dict[int, asyncio.Future[None]] = field(default_factory=dict)  # first pongs awaited, by user
    seq_gaps: int = 0  # a frame id more than one past the previous
    seq_backwards: int = 0  # a frame id not above the previous (a replayed or reordered event)
    unknown: int = 0  # message.new for a client_id this run never sent
    strangers: int = 0  # message.new heard by a user who is neither author nor recipient
    other_frames: Counter[str] = field(default_factory=Counter)
    dropped: Errors = field(default_factory=Errors)  # sockets closed under us
    urls: list[str] = field(default_factory=list)  # by user
    reconnects: int = 0
    reconnect_failures: Errors = field(default_factory=Errors)
    open_failures: Errors = field(default_factory=Errors)  # first connects that failed (and were tried again)
    given_up: set[int] = field(default_factory=set)  # users whose socket stayed down
    readers: list[asyncio.Task[None]] = field(default_factory=list)
    closing: bool = False

    async def read(self, user: int, ws: ClientConnection) -> None:
        """Check every frame of one user's socket. When the server drops it after its first pong, reconnect and
        resume from the last frame id seen, as the apps do (up to MAX_RECONNECTS times)."""
        last = 0  # fresh users: the stream starts at 1
        records = self.records
        reconnects = 0
        try:
            while True:
                try:
                    while True:
                        raw = await ws.recv(decode=False)
                        now = time.perf_counter()
                        frame = FRAMES.decode(raw)
                        if frame.type == "pong":
                            self.pongs += 1
                            self.ponged.add(user)
                            waiter = self.awaiting.pop(user, None)
                            if waiter is not None and not waiter.done():
                                waiter.set_result(None)
                            continue
                        if frame.id is not None:
                            seq = int(frame.id)
                            if seq <= last:
                                self.seq_backwards += 1
                            elif seq != last + 1:
                                self.seq_gaps += 1
                            last = max(last, seq)
                        if frame.type != "message.new":
                            self.other_frames[frame.type] += 1
                            continue
                        data = MESSAGES.decode(frame.data)
                        sent = records.get(data.client_id)
                        if sent is None:
                            self.unknown += 1
                        elif user == sent.recipient:
                            if sent.delivered:
                                sent.duplicates += 1
                            else:
                                sent.delivered = now
                        elif user == sent.author:
                            if sent.echoed:
                                sent.duplicates += 1
                            else:
                                sent.echoed = now
                        else:
                            self.strangers += 1
                except websockets.ConnectionClosed as exc:
                    if self.closing:
                        return
                    self.dropped.add("socket closed", f"user {user}: {exc}")
                    if user in self.awaiting or reconnects >= MAX_RECONNECTS:
                        self.given_up.add(user)
                        return
                reconnected = None
                while reconnected is None and reconnects < MAX_RECONNECTS:
                    reconnects += 1
                    reconnected = await self.reconnect(user, last)
                if reconnected is None:
                    if not self.closing:
                        self.given_up.add(user)
                    return
                ws = reconnected
        except (msgspec.DecodeError, ValueError) as exc:
            self.dropped.add("bad frame", f"user {user}: {exc}")
            self.given_up.add(user)
        finally:
            waiter = self.awaiting.pop(user, None)
            if waiter is not None and not waiter.done():
                waiter.set_exception(RuntimeError(f"socket of user {user} ended before its first pong: "
                                                  f"{self.dropped.samples[-1:]}"))

    async def reconnect(self, user: int, last: int) -> ClientConnection | None:
        await asyncio.sleep(random.uniform(0.5, 1.5))  # apps back off, and not all at the same moment
        try:
            ws = await open_socket(self.urls[user], 10.0)
            await ws.send(msgspec.json.encode({"type": "resume", "data": {"last_event_id": str(last)}}).decode())
        except (OSError, TimeoutError, websockets.InvalidHandshake, websockets.ConnectionClosed) as exc:
            self.reconnect_failures.add(type(exc).__name__, f"user {user}: {exc}")
            return None
        if self.closing:  # the run ended meanwhile
            await ws.close()
            return None
        self.connections[user] = ws
        self.reconnects += 1
        return ws

    async def ping(self, stop: asyncio.Event, interval: float = PING_INTERVAL_S) -> None:
        """Every socket pings once per `interval` seconds, spread evenly over it; ends when `stop` is set."""
        step = 0.1
        per_step = max(1, math.ceil(len(self.connections) * step / interval))
        i = 0
        while not stop.is_set():
            for _ in range(per_step):
                ws = self.connections[i % len(self.connections)]
                i += 1
                if ws is not None:
                    with contextlib.suppress(websockets.ConnectionClosed):
                        await ws.send(PING)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), step)


async def open_socket(url: str, timeout: float) -> ClientConnection:
    return await websockets.connect(url, compression=None, proxy=None, ping_interval=None, open_timeout=timeout,
                                    close_timeout=2, max_queue=None)


async def connect_all(port: int, tokens: list[str], sockets: Sockets, concurrency: int,
                      timeout: float, users: range | None = None) -> float:
    """Open the sockets of `users` (default: everyone), start their readers and wait for the answer to a first
    ping (so the server has registered each and reads its frames), at most `concurrency` at once; the seconds
    it took. Called again with the next range, it opens the next users' sockets beside those already open.

    Bounded so that a burst of first pings does not queue every presence update on the server's Redis pool
    at once."""
    started = time.perf_counter()
    gate = asyncio.Semaphore(concurrency)
    if len(sockets.connections) != len(tokens):
        sockets.connections = [None] * len(tokens)
        sockets.urls = [f"ws://{HOST}:{port}/api/v1/ws?token={token}" for token in tokens]
    connections = sockets.connections
    users = users if users is not None else range(len(tokens))

    async def one(i: int) -> None:
        async with gate:
            for attempt in range(1, OPEN_ATTEMPTS + 1):  # an app whose first connect fails tries again
                try:
                    ws = await open_socket(sockets.urls[i], timeout)
                    break
                except (OSError, websockets.InvalidHandshake, websockets.InvalidMessage) as exc:
                    sockets.open_failures.add(type(exc).__name__, f"user {i}, attempt {attempt}: {exc}")
                    if attempt == OPEN_ATTEMPTS:
                        raise
                    await asyncio.sleep(random.uniform(0.2, 0.6))
            connections[i] = ws
            answered = sockets.awaiting[i] = asyncio.get_running_loop().create_future()
            sockets.readers.append(asyncio.create_task(sockets.read(i, ws)))
            await ws.send(PING)
            await answered

    tasks = [asyncio.create_task(one(i)) for i in users]
    try:
        async with asyncio.timeout(timeout):
            await asyncio.gather(*tasks)
    except TimeoutError:
        silent = [i for i in users if i not in sockets.ponged]
        states = [(i, c.state.name if (c := connections[i]) else "never opened") for i in silent[:5]]
        raise RuntimeError(f"only {len(sockets.ponged)} of {users.stop} sockets answered a first ping within "
                           f"{timeout} s; silent (user, state): {states}; {sockets.dropped.samples}") from None
    finally:
        for task in tasks:  # on a failure, the others stop too; the caller closes what is open
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    sockets.awaiting.clear()
    return time.perf_counter() - started


class Sender:
    """Open-loop sends on a timetable over a fixed pool of keep-alive connections."""

    def __init__(self, port: int, people: People, tokens: list[str], sockets: Sockets, connections: int,
                 chatting: int | None = None) -> None:
        self.people = people
        self.chatting = chatting or people.pairs  # the pairs that send: the first ones; the rest only listen
        self.tokens = tokens
        self.records = sockets.records
        self.pool: asyncio.Queue[RawConnection] = asyncio.Queue()
        self.all = [RawConnection(port) for _ in range(connections)]
        for c in self.all:
            self.pool.put_nowait(c)
        self.tag = secrets.token_hex(3)
        self.count = 0
        self.rng = random.Random()

    async def run(self, phase: Phase, seconds: float) -> set[asyncio.Task[None]]:
        """Start the phase's sends at their times; returns the tasks still busy when the timetable ends."""
        total = max(1, round(phase.rate * seconds))
        tasks: set[asyncio.Task[None]] = set()
        start = time.perf_counter() + 0.001
        phase.started_at = start
        i = 0
        while i < total:
            now = time.perf_counter()
            due = min(total, int((now - start) * phase.rate) + 1)
            while i < due:
                task = asyncio.create_task(self.send(phase, i, start + i / phase.rate))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
                i += 1
            if i < total:
                await asyncio.sleep(max(0.0, start + i / phase.rate - time.perf_counter()))
        phase.scheduled = total
        phase.schedule_end = start + total / phase.rate
        return tasks

    async def send(self, phase: Phase, i: int, slot: float) -> None:
        phase.lateness.record(time.perf_counter() - slot)  # this loop's own lag, before any wait for a connection
        pair = self.rng.randrange(self.chatting)
        patient, doctor = pair, self.people.pairs + pair
        author, recipient = (patient, doctor) if i % 2 == 0 else (doctor, patient)
        self.count += 1
        client_id = f"{self.tag}-{self.count}"
        sent = Sent(phase, author, recipient, slot)
        conn = await self.pool.get()
        try:
            sent.written = time.perf_counter()
            lateness = sent.written - slot
            phase.max_lateness = max(phase.max_lateness, lateness)
            if lateness > LATE_S:
                phase.late += 1
            phase.started += 1
            phase.records.append(sent)
            self.records[client_id] = sent  # before the write: the frame may come before the answer
            try:
                status, body = await conn.request(
                    "POST", f"/api/v1/chats/{self.people.conversations[pair]}/messages",
                    {"client_id": client_id, "text": f"{phase.name} #{i} slot {slot:.6f}"},
                    token=self.tokens[author])
            except TRANSPORT_ERRORS as exc:
                phase.errors.add(f"POST {type(exc).__name__}", str(exc))
                return
            sent.answered, sent.status = time.perf_counter(), status
            phase.statuses[status] += 1
            if status != 201:
                phase.errors.add(f"POST {status}", body.decode(errors="replace"))
        finally:
            self.pool.put_nowait(conn)

    async def aclose(self) -> None:
        for c in self.all:
            await c.aclose()


async def drain(phase: Phase, busy: set[asyncio.Task[None]]) -> float:
    """Wait for the phase's sends to finish (bounded), then for its messages to arrive (bounded): seconds spent."""
    t0 = time.perf_counter()
    if busy:
        _, pending = await asyncio.wait(set(busy), timeout=POST_DRAIN_S)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        phase.abandoned = len(pending)
    deadline = time.perf_counter() + STRAGGLER_S
    while time.perf_counter() < deadline:
        if all(s.delivered and s.echoed for s in phase.records if s.status == 201):
            break
        await asyncio.sleep(0.02)
    return time.perf_counter() - t0


def phase_report(phase: Phase, usage: dict[str, float] | None, server_pid: int, down: set[int],
                 idle_server_pct: float = 0.0, answered: int = 0) -> dict[str, Any]:
    """The phase's figures; with `usage` (its measured window) also CPU and throughput, where `answered` is how
    many sends of this rate (warm-up included: under overload its backlog is served first) got their 201 in the
    window."""
    created = [s for s in phase.records if s.status == 201]
    delivered = [s for s in created if s.delivered]
    report: dict[str, Any] = {
        "rate": phase.rate, "scheduled": phase.scheduled, "sent": phase.started,
        "created_201": len(created), "post_errors": phase.errors.total,
        "abandoned": phase.abandoned, "late_sends": phase.late,
        "max_lateness_ms": round(phase.max_lateness * 1000, 2), "generator_late": phase.lateness.summary(),
        "delivered": len(delivered), "lost": len(created) - len(delivered),
        "echo_lost": sum(1 for s in created if not s.echoed),
        "lost_to_socket_down": sum(1 for s in created if not s.delivered and s.recipient in down),
        "delivered_without_201": sum(1 for s in phase.records if s.status != 201 and s.delivered),
        "duplicates": sum(s.duplicates for s in phase.records),
        "delivery": latency_summary([s.delivered - s.written for s in delivered]),
        "delivery_from_slot": latency_summary([s.delivered - s.scheduled for s in delivered]),
        "post": latency_summary([s.answered - s.written for s in created]),
        "statuses": {str(k): v for k, v in sorted(phase.statuses.items())},
        "error_kinds": dict(phase.errors.counts), "error_samples": phase.errors.samples,
    }
    if usage is not None:
        wall = usage["wall_s"] or 1.0
        report.update(usage)
        report["answered_in_window"] = answered
        report["answered_per_s"] = round(answered / wall, 1)  # the server's throughput
        report["server_cpu_pct"] = round(100 * usage["server_cpu_s"] / wall, 1)
        report["client_cpu_pct"] = round(100 * usage["client_cpu_s"] / wall, 1)
        report["postgres_cpu_pct"] = round(100 * usage["postgres_cpu_s"] / wall, 1)
        report["redis_cpu_pct"] = round(100 * usage["redis_cpu_s"] / wall, 1)
        done = max(1, answered)  # the server's CPU per message created, less what idle sockets cost
        report["server_cpu_ms_per_msg"] = round(1000 * usage["server_cpu_s"] / done, 2)
        report["server_cpu_ms_per_msg_net"] = round(
            1000 * max(0.0, usage["server_cpu_s"] - idle_server_pct / 100 * wall) / done, 2)
        report.update({f"server_{k}_mib": round(v, 1) for k, v in tree_memory_mib(server_pid).items()})
    return report


def meets_goal(r: dict[str, Any]) -> bool:
    return bool(r["delivery"]["p99_ms"] < P99_GOAL_MS and r["lost"] == 0 and r["echo_lost"] == 0
                and r["duplicates"] == 0 and r["post_errors"] == 0 and r["abandoned"] == 0
                and r["late_sends"] <= 0.01 * max(1, r["scheduled"]))


# --- the run ----------------------------------------------------------------------------------


def log_summary(path: Path, kinds: int = 10) -> list[str]:
    """What the server logged (at LOG_LEVEL=WARNING: warnings and errors), counted by kind: level, logger,
    message, request path and the exception's last line."""
    counts: Counter[str] = Counter()
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return []
    for line in lines:
        if not line.strip() or line.startswith("Clinic API:"):
            continue
        try:
            entry = msgspec.json.decode(line)
            exc = str(entry.get("exc", "")).strip().splitlines()
            kind = (f"{entry.get('level')} {entry.get('logger')}: {entry.get('msg')}"
                    + (f" ({UUID_TEXT.sub('{id}', str(entry['path']))})" if entry.get("path") else "")
                    + (f" <- {exc[-1][:200]}" if exc else ""))
        except (msgspec.DecodeError, AttributeError):
            kind = line[:300]
        counts[kind] += 1
    return [f"{n} x {kind}" for kind, n in counts.most_common(kinds)]


def raise_fd_limit(needed: int) -> int:
    """Room for every socket here and in the server: this process's soft open-file limit up to its hard one
    (the server child gets the same through preexec_fn); the soft limit now. The app's defaults stay as they
    are: an operator sets the limit of a real deployment."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        soft = hard
    if soft != resource.RLIM_INFINITY and soft < needed:
        raise RuntimeError(f"the open-file limit is {soft}, and {needed} are needed: raise the hard limit "
                           f"(ulimit -Hn) or open fewer sockets")
    return int(soft)


def start_chat_server(database_url: str, tmp: Path, port: int, extra: dict[str, str],
                      cores: set[int] | None) -> subprocess.Popen[bytes]:
    """`python -m app serve` with this process's open-file limit, on `cores` when given (from its first
    instruction on, so every thread and worker process it starts stays there)."""
    limit = resource.getrlimit(resource.RLIMIT_NOFILE)

    def prepare() -> None:  # in the child, before exec
        resource.setrlimit(resource.RLIMIT_NOFILE, limit)
        if cores is not None:
            os.sched_setaffinity(0, cores)

    env = server_env(database_url, tmp, port, extra)
    with (tmp / "server.log").open("wb") as log:
        return subprocess.Popen([sys.executable, "-m", "app", "serve"], cwd=ROOT, env=env, stdout=log,
                                stderr=subprocess.STDOUT, preexec_fn=prepare)


def children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, ValueError, IndexError):
                if parent_pid(int(entry.name)) == pid:
                    found.append(int(entry.name))
    return found


def process_tree(pid: int) -> list[int]:
    tree, todo = [], [pid]
    while todo:
        p = todo.pop()
        tree.append(p)
        todo.extend(children(p))
    return tree


def tree_memory_mib(pid: int) -> dict[str, float]:
    """VmRSS and VmHWM summed over a process and its descendants (the server's worker processes when
    WORKERS > 1; one process otherwise)."""
    total = {"VmRSS": 0.0, "VmHWM": 0.0}
    for p in process_tree(pid):
        with contextlib.suppress(OSError):
            for key, value in proc_memory_mib(p).items():
                total[key] += value
    return total


def tree_rss_mib(pid: int) -> float:
    return tree_memory_mib(pid)["VmRSS"]


def snapshot(pids: Pids, server_tree: list[int]) -> CpuSnapshot:
    """CPU of every process now, the server's summed over its tree (its worker processes when WORKERS > 1)."""
    taken = CpuSnapshot.take(pids)
    total = 0.0
    for p in server_tree:
        with contextlib.suppress(OSError):
            total += proc_cpu_seconds(p)
    taken.server = total
    return taken


def pin(pids: list[int], cores: set[int]) -> int:
    """Every thread of these processes onto `cores` (threads and children started later inherit it); how many
    threads were moved."""
    moved = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            for tid in os.listdir(f"/proc/{pid}/task"):
                with contextlib.suppress(OSError):
                    os.sched_setaffinity(int(tid), cores)
                    moved += 1
    return moved


def affinity(pid: int) -> list[int]:
    try:
        return sorted(os.sched_getaffinity(pid))
    except OSError:
        return []


async def run(args: argparse.Namespace, tmp: Path, loop_name: str) -> tuple[dict[str, Any], bool]:
    postgres_url = os.environ["TEST_POSTGRES_URL"]
    t0 = time.monotonic()
    db_name, db_url = await create_database(postgres_url)
    jwt_keys, secret_key = f"k1={secrets.token_urlsafe(36)}", secrets.token_urlsafe(36)
    extra = {"JWT_KEYS": jwt_keys, "SECRET_KEY": secret_key, "CHAT_SENDS_PER_MINUTE": "1000000",
             "DB_POOL_SIZE": "40", "LOG_REQUESTS": "false", "LOG_LEVEL": "WARNING", **dict(args.server_env)}
    issuer = TokenIssuer(Settings(jwt_keys=jwt_keys, secret_key=secret_key, data_dir=str(tmp)))
    port = free_port()
    proc = None
    sockets = Sockets()
    stop_pings = asyncio.Event()
    pinger: asyncio.Task[None] | None = None
    sender: Sender | None = None
    reports: list[dict[str, Any]] = []
    warmups: list[dict[str, Any]] = []
    latenesses: list[Lateness] = []
    db = DbStats(postgres_url, db_name)
    services: list[int] = []  # PostgreSQL's and Redis's processes, moved to the server's core by --pin
    everywhere = set(range(os.cpu_count() or 1))
    pinning: dict[str, Any] = {}
    sweep: list[dict[str, float]] = []
    try:
        people = await create_people(pg_dsn(postgres_url, db_name), args.clients // 2)
        tokens = [issuer.issue_access(u, r) for u, r in zip(people.ids, people.roles, strict=True)]
        setup_db_s = time.monotonic() - t0
        redis_port = urlsplit(os.environ["TEST_REDIS_URL"]).port
        postmaster, redis_pid = await db.postmaster_pid(), find_redis_pid(redis_port) if redis_port else None
        if args.pin:
            # PostgreSQL's backends are forked by its postmaster: pinned, the ones it forks later stay there too
            services = [p for p in ([postmaster] if postmaster else []) for p in process_tree(p)]
            services += [redis_pid] if redis_pid else []
            pinning["service_threads"] = pin(services, {SERVER_CORE})
            pinning["generator_threads"] = pin([os.getpid()], {GENERATOR_CORE})
        proc = start_chat_server(db_url, tmp, port, extra, {SERVER_CORE} if args.pin else None)
        ready_s = await wait_ready(proc, port, tmp / "server.log")
        idle_rss = tree_rss_mib(proc.pid)
        pids = Pids(server=proc.pid, postmaster=postmaster, redis=redis_pid)
        server_tree = process_tree(proc.pid)  # with WORKERS > 1: the supervisor and its workers, started by now
        if args.pin:
            pinning.update({"server": affinity(proc.pid), "generator": affinity(os.getpid()),
                            "postgres": affinity(postmaster) if postmaster else [],
                            "redis": affinity(redis_pid) if redis_pid else []})
        pinning["server_nofile"] = resource.prlimit(proc.pid, resource.RLIMIT_NOFILE)[0]
        connect_s = 0.0
        # pings from the first socket on: the server closes one silent for WS_HEARTBEAT_SECONDS, and opening
        # ten thousand takes longer than that
        sockets.connections = [None] * len(tokens)
        sockets.urls = [f"ws://{HOST}:{port}/api/v1/ws?token={token}" for token in tokens]
        pinger = asyncio.create_task(sockets.ping(stop_pings, args.ping_interval))
        for step in args.sweep:  # open the sockets in steps, the server's RSS after each
            connect_s += await connect_all(port, tokens, sockets, args.connect_concurrency, args.connect_timeout,
                                           range(sweep[-1]["sockets"] if sweep else 0, step))
            await asyncio.sleep(0.5)  # the last sockets' first frames handled
            rss = tree_rss_mib(proc.pid)
            sweep.append({"sockets": step, "rss_mib": round(rss, 1),
                          "mib_per_1000": round(1000 * (rss - idle_rss) / step, 1)})
            print(f"{step} sockets open: server RSS {rss:.1f} MiB, {sweep[-1]['mib_per_1000']} MiB per 1000 "
                  f"sockets", file=sys.stderr, flush=True)
        connected_rss = sweep[-1]["rss_mib"]
        chatting = max(1, round(people.pairs * args.chatting))
        sender = Sender(port, people, tokens, sockets, args.connections, chatting)
        idle: dict[str, float] = {}
        if args.idle_seconds > 0:  # what the open sockets cost (pings, presence) before any message
            before = snapshot(pids, server_tree)
            await asyncio.sleep(args.idle_seconds)
            idle = cpu_used(before, snapshot(pids, server_tree))
            idle["server_cpu_pct"] = round(100 * idle["server_cpu_s"] / (idle["wall_s"] or 1.0), 1)
        for rate in args.rates:
            if proc.poll() is not None:
                raise RuntimeError(f"server died during the run:\n{tail(tmp / 'server.log')}")
            # this process's own collector pauses would read as server latency: none while sending
            gc.collect()
            gc.freeze()
            gc.disable()
            if args.warmup > 0:
                warm = Phase(f"warm-{rate:g}", rate, measured=False)
                busy = await sender.run(warm, args.warmup)
            else:
                warm, busy = None, set()
            phase = Phase(f"rate-{rate:g}", rate, measured=True)
            latenesses.append(phase.lateness)
            before, cpu_before = snapshot(pids, server_tree), CpuTimes.read()
            busy |= await sender.run(phase, args.seconds)
            after, cpu_after = snapshot(pids, server_tree), CpuTimes.read()
            drain_s = await drain(phase, busy)
            gc.enable()
            if warm is not None:
                warmups.append(phase_report(warm, None, proc.pid, sockets.given_up))
            answered = sum(1 for s in (warm.records if warm else []) + phase.records
                           if s.status == 201 and before.wall <= s.answered <= after.wall)
            report = phase_report(phase, cpu_used(before, after), proc.pid, sockets.given_up,
                                  idle.get("server_cpu_pct", 0.0), answered)
            report["drain_s"] = round(drain_s, 2)
            if cpu_before is not None and cpu_after is not None:
                report.update(cpu_shares(cpu_before, cpu_after))
            reports.append(report)
            print(f"rate {rate:g}/s: sent {report['sent']}, delivered {report['delivered']}, lost {report['lost']}, "
                  f"delivery p99 {report['delivery']['p99_ms']} ms, server CPU {report['server_cpu_pct']}%, "
                  f"generator late p99 {report['generator_late']['p99_ms']} ms",
                  file=sys.stderr, flush=True)
        if proc.poll() is not None:
            raise RuntimeError(f"server died during the run:\n{tail(tmp / 'server.log')}")
        sessions = await db.sessions()
    except BaseException:
        print(f"server log (tail):\n{tail(tmp / 'server.log', 60)}", file=sys.stderr, flush=True)
        raise
    finally:
        stop_pings.set()
        sockets.closing = True
        if pinger is not None:
            await asyncio.gather(pinger, return_exceptions=True)
        if sender is not None:
            await sender.aclose()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(10):
                await asyncio.gather(*(ws.close() for ws in sockets.connections if ws is not None),
                                     return_exceptions=True)
        for task in sockets.readers:
            task.cancel()
        await asyncio.gather(*sockets.readers, return_exceptions=True)
        code = stop_server(proc) if proc is not None else None
        if args.pin:  # the harness's services and this process go back to every core
            pin([*services, os.getpid()], everywhere)
        with contextlib.suppress(OSError, asyncpg.PostgresError):
            await drop_database(postgres_url, db_name)
    best = [r["rate"] for r in reports if meets_goal(r)]
    result: dict[str, Any] = {
        "config": {"clients": args.clients, "pairs": args.clients // 2, "chatting_pairs": chatting,
                   "rates": args.rates, "ping_interval_s": args.ping_interval, "pin": args.pin,
                   "seconds": args.seconds, "warmup_s": args.warmup, "http_connections": args.connections,
                   "loop": loop_name, "cores": os.cpu_count(), "server_env": dict(args.server_env)},
        "setup_db_s": round(setup_db_s, 2), "server_ready_s": round(ready_s, 2),
        "connect_s": round(connect_s, 2), "idle": idle, "server_idle_rss_mib": round(idle_rss, 1),
        "server_connected_rss_mib": round(connected_rss, 1), "socket_sweep": sweep, "pinning": pinning,
        "db_sessions_opened": sessions,
        "sockets": {"opened": sum(1 for c in sockets.connections if c is not None),
                    "dropped": sockets.dropped.total, "reconnects": sockets.reconnects,
                    "reconnect_failures": sockets.reconnect_failures.total,
                    "reconnect_failure_samples": sockets.reconnect_failures.samples,
                    "open_failures": sockets.open_failures.total,
                    "open_failure_samples": sockets.open_failures.samples,
                    "given_up": len(sockets.given_up),
                    "dropped_samples": sockets.dropped.samples, "seq_gaps": sockets.seq_gaps,
                    "seq_backwards": sockets.seq_backwards, "unknown_messages": sockets.unknown,
                    "strangers": sockets.strangers, "other_frames": dict(sockets.other_frames),
                    "pongs": sockets.pongs},
        "server_stopped_cleanly": code in (0, -signal.SIGTERM),
        "server_log": log_summary(tmp / "server.log"),
        "pids": vars(pids), "rates": reports, "warmups": warmups, "latenesses": latenesses,
        "best_rate_p99_under_50ms": max(best) if best else None,
    }
    everything = reports + warmups
    failed = bool(sum(r["lost"] + r["echo_lost"] + r["duplicates"] for r in everything)
                  or sockets.dropped.total or sockets.seq_gaps or sockets.seq_backwards or sockets.strangers)
    return result, failed


def print_table(result: dict[str, Any]) -> None:
    reports, cfg, pids = result["rates"], result["config"], result["pids"]

    def row(label: str, cell: Any) -> list[str]:
        return [label] + [str(cell(r)) for r in reports]

    rows = [
        ["target rate msg/s"] + [f"{r['rate']:g}" for r in reports],
        row("messages sent (POSTs)", lambda r: f"{r['sent']} of {r['scheduled']}"),
        row("201 answers/s in window", lambda r: r["answered_per_s"]),
        row("sends late >10 ms", lambda r: f"{r['late_sends']} (max {r['max_lateness_ms']} ms)"),
        row("generator late p50/p99 ms", lambda r: f"{r['generator_late']['p50_ms']}/{r['generator_late']['p99_ms']}"),
        row("abandoned at drain", lambda r: r["abandoned"]),
        row("POST 201", lambda r: r["created_201"]),
        row("POST errors", lambda r: r["post_errors"]),
        row("delivered to other side", lambda r: r["delivered"]),
        row("lost (other side)", lambda r: f"{r['lost']} ({r['lost_to_socket_down']} to a socket down)"),
        row("lost (author's echo)", lambda r: r["echo_lost"]),
        row("duplicates", lambda r: r["duplicates"]),
        row("delivery p50 ms", lambda r: r["delivery"]["p50_ms"]),
        row("delivery p99 ms", lambda r: r["delivery"]["p99_ms"]),
        row("delivery max ms", lambda r: r["delivery"]["max_ms"]),
        row("from slot p99 ms", lambda r: r["delivery_from_slot"]["p99_ms"]),
        row("POST p50 ms", lambda r: r["post"]["p50_ms"]),
        row("POST p99 ms", lambda r: r["post"]["p99_ms"]),
        row("wall s (measured)", lambda r: r["wall_s"]),
        row("server CPU s (% core)", lambda r: f"{r['server_cpu_s']} ({r['server_cpu_pct']}%)"),
        row("server CPU ms/msg (net)", lambda r: f"{r['server_cpu_ms_per_msg']} ({r['server_cpu_ms_per_msg_net']})"),
        row("load gen CPU s (% core)", lambda r: f"{r['client_cpu_s']} ({r['client_cpu_pct']}%)"),
        row("postgres CPU s (% core)", lambda r: f"{known(r['postgres_cpu_s'], pids['postmaster'])} "
                                                  f"({r['postgres_cpu_pct']}%)"),
        row("redis CPU s (% core)", lambda r: f"{known(r['redis_cpu_s'], pids['redis'])} ({r['redis_cpu_pct']}%)"),
        row("other CPU s", lambda r: r["other_cpu_s"]),
        row("machine busy %", lambda r: r["machine_busy_pct"]),
        row("steal % / iowait %", lambda r: f"{r.get('steal_pct')} / {r.get('iowait_pct')}"),
        row("server RSS MiB (peak)", lambda r: f"{r['server_VmRSS_mib']} ({r['server_VmHWM_mib']})"),
        row("drain s", lambda r: r["drain_s"]),
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    workers = dict(cfg["server_env"]).get("WORKERS", "1")
    print(f"\nclinic chat benchmark: {workers} server worker(s), {cfg['clients']} WebSocket clients "
          f"({cfg['pairs']} pairs, {cfg['chatting_pairs']} chatting), pings every {cfg['ping_interval_s']:g} s, "
          f"{cfg['http_connections']} HTTP connections, {cfg['loop']} loop, {cfg['cores']} cores; "
          f"{cfg['warmup_s']} s warm-up + {cfg['seconds']} s per rate; server ready in {result['server_ready_s']} s, "
          f"sockets connected in {result['connect_s']} s, server RSS idle {result['server_idle_rss_mib']} MiB, "
          f"with sockets {result['server_connected_rss_mib']} MiB"
          + (f"; server env {cfg['server_env']}" if cfg["server_env"] else ""))
    print(describe(result.get("conditions", {})))
    pinning = result["pinning"]
    print(f"open-file limit {result['nofile']} here, {pinning.get('server_nofile')} in the server"
          + (f"; pinned: server {pinning['server']}, postgres {pinning['postgres']}, redis {pinning['redis']}, "
             f"load generator {pinning['generator']} (cores)" if cfg["pin"] else ""))
    if len(result["socket_sweep"]) > 1 or cfg["clients"] >= 2000:
        print("socket sweep: " + ", ".join(f"{s['sockets']} sockets {s['rss_mib']} MiB "
                                           f"({s['mib_per_1000']} MiB/1000)" for s in result["socket_sweep"]))
    else:
        print(f"server RSS per 1000 sockets: {result['socket_sweep'][-1]['mib_per_1000']} MiB")
    for i, cells in enumerate(rows):
        print("  ".join(c.ljust(widths[j]) if j == 0 else c.rjust(widths[j]) for j, c in enumerate(cells)))
        if i == 0:
            print("  ".join("-" * w for w in widths))
    idle = result["idle"]
    if idle:
        print(f"idle ({idle['wall_s']} s, sockets open, no messages): server CPU {idle['server_cpu_s']} s "
              f"({idle['server_cpu_pct']}% of a core), load generator {idle['client_cpu_s']} s, "
              f"postgres {idle['postgres_cpu_s']} s, redis {idle['redis_cpu_s']} s")
    s = result["sockets"]
    print(f"sockets: {s['opened']} opened ({s['open_failures']} first connects failed and were tried again), "
          f"{s['dropped']} dropped by the server, {s['reconnects']} reconnected "
          f"and resumed, {s['reconnect_failures']} reconnects failed, {s['given_up']} stayed down; "
          f"frame id gaps {s['seq_gaps']}, "
          f"out of order {s['seq_backwards']}, unknown messages {s['unknown_messages']}, "
          f"to strangers {s['strangers']}, other frames {s['other_frames']}, pongs {s['pongs']}")
    for w in result["warmups"]:
        if w["lost"] or w["echo_lost"] or w["duplicates"] or w["post_errors"]:
            print(f"warm-up at {w['rate']:g}/s: lost {w['lost']}, echo lost {w['echo_lost']}, "
                  f"duplicates {w['duplicates']}, POST errors {w['post_errors']}")
    for sample in s["dropped_samples"] + s["reconnect_failure_samples"] + s["open_failure_samples"]:
        print(f"socket: {sample}")
    for r in reports:
        for sample in r["error_samples"]:
            print(f"at {r['rate']:g}/s: {sample}")
        if r["client_cpu_s"] >= 0.8 * r["server_cpu_s"]:
            print(f"note: at {r['rate']:g}/s the load generator used {r['client_cpu_s']} CPU s against the "
                  f"server's {r['server_cpu_s']}: it competes for the cores")
    best = result["best_rate_p99_under_50ms"]
    print(f"highest rate with delivery p99 < {P99_GOAL_MS:g} ms (nothing lost, no POST errors, <=1% late): "
          + (f"{best:g} msg/s" if best is not None else "none of those run"))
    if not result["server_stopped_cleanly"]:
        print("note: the server did not stop cleanly on SIGTERM")
    for line in result["server_log"]:
        print(f"server log: {line}")


def rate_list(text: str) -> list[float]:
    try:
        rates = [float(x) for x in text.split(",") if x.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError("expected rates like 100,500,1000") from exc
    if not rates or any(not 0 < r <= 20_000 for r in rates):
        raise argparse.ArgumentTypeError("rates must be in (0, 20000]")
    return rates


def count_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError("expected counts like 2500,5000,10000") from exc


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.chat", description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", type=int, default=1000, help="WebSocket clients, half patients (default 1000)")
    p.add_argument("--rates", type=rate_list, default=[100.0, 500.0, 1000.0],
                   help="messages per second, one run each (default 100,500,1000)")
    p.add_argument("--seconds", type=float, default=15.0, help="measured time per rate (default 15)")
    p.add_argument("--warmup", type=float, default=2.0, help="warm-up per rate at the same rate (default 2)")
    p.add_argument("--idle-seconds", type=float, default=5.0,
                   help="measure the server with the sockets open and no messages first (default 5; 0: skip)")
    p.add_argument("--connections", type=int, default=64, help="keep-alive HTTP connections (default 64)")
    p.add_argument("--connect-concurrency", type=int, default=50, help="sockets opening at once (default 50)")
    p.add_argument("--connect-timeout", type=float, default=60.0, help="for all sockets to open (default 60)")
    p.add_argument("--pin", action="store_true",
                   help=f"the server, PostgreSQL and Redis on core {SERVER_CORE}, this load generator on core "
                        f"{GENERATOR_CORE} (the one-core setup: --pin --clients 100 --rates 200,500,750)")
    p.add_argument("--chatting", type=float, default=1.0,
                   help="the share of pairs that send; the others only hold their sockets (default 1)")
    p.add_argument("--sweep", type=count_list, default=None,
                   help="open the sockets in steps, the server's RSS after each, e.g. 2500,5000,10000 "
                        "(default: all at once; the last step must be --clients)")
    p.add_argument("--ping-interval", type=float, default=PING_INTERVAL_S,
                   help=f"seconds between one socket's pings (default {PING_INTERVAL_S:g}; the server drops a "
                        f"socket silent for WS_HEARTBEAT_SECONDS, 30 by default)")
    p.add_argument("--server-env", type=env_pair, action="append", default=[], metavar="NAME=VALUE",
                   help="extra server setting, e.g. DB_POOL_SIZE=60 (repeatable)")
    args = p.parse_args(argv)
    if not 2 <= args.clients <= 10_000 or args.clients % 2:
        p.error("--clients: an even number 2..10000")
    if not 0 < args.seconds <= 120 or not 0 <= args.warmup <= 30 or not 0 <= args.idle_seconds <= 60:
        p.error("--seconds 0..120, --warmup 0..30, --idle-seconds 0..60")
    if not 1 <= args.connections <= 512 or not 1 <= args.connect_concurrency <= 500:
        p.error("--connections 1..512, --connect-concurrency 1..500")
    if not 1 <= args.connect_timeout <= 300:
        p.error("--connect-timeout 1..300")
    if not 0 < args.chatting <= 1 or not 1 <= args.ping_interval <= 60:
        p.error("--chatting in (0, 1], --ping-interval 1..60")
    args.sweep = args.sweep or [args.clients]
    if args.sweep[-1] != args.clients or any(a >= b for a, b in itertools.pairwise(args.sweep)):
        p.error("--sweep: rising socket counts ending at --clients")
    if args.pin and (os.cpu_count() or 1) < 2:
        p.error("--pin needs two cores")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    try:
        nofile = raise_fd_limit(args.clients + args.connections + 1024)  # per process: here, and in the server
        conditions = Conditions.start()  # before the server starts and after it stopped: the machine alone
        outcome = run_benchmark(lambda tmp, loop: run(args, tmp, loop))
    except RuntimeError as exc:  # the setup or the server failed: said plainly, the server already stopped
        print(f"FAILED: {exc}", file=sys.stderr)
        return 1
    if outcome is None:
        return 2
    result, failed = outcome
    lateness = Lateness()  # the generator's, over every measured rate
    for phase_lateness in result.pop("latenesses"):
        lateness.samples.extend(phase_lateness.samples)
    result["conditions"] = conditions.finish(lateness)
    result["nofile"] = nofile
    result["total_s"] = round(time.monotonic() - started, 1)
    print_table(result)
    print(f"total run time {result['total_s']} s")
    print(msgspec.json.encode(result).decode(), flush=True)
    if failed:
        print("FAILED: messages lost or duplicated, or sockets dropped or out of order (see above)", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
