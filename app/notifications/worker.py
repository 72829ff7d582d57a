"""The outbox worker: turns committed outbox rows into pushes (and reminder SMS) and loses none of them.

A pass claims due rows (a conditional UPDATE; on PostgreSQL over `FOR UPDATE SKIP LOCKED`, so several workers
never take one row) and holds them by a lease: the claim moves the row's next due time to the lease's end, so a
worker killed mid-send leaves rows that fall due again by themselves. The rows' pushes go to the provider in one
call; each target's outcome is recorded (outbox_delivery), so a retry resends only what did not succeed. A push
whose answer was lost (a timeout, a kill before the outcome was written) is sent once more with the same collapse
key, and the phone shows it once. Retries back off exponentially with jitter; after OUTBOX_MAX_ATTEMPTS the row
is marked failed (GET /api/v1/outbox/failed, the metrics).

Who is pushed: user ids and `role:<role>` (active staff with the role); a dependent's events go to the guardian;
staff only for the topics they opted into (STAFF_TOPICS unless they chose); nobody with a socket in the
foreground (they saw it live); nobody within their quiet hours (held until the end), calls excepted. A push
carries `{type, ref}` only: no name, phone, diagnosis or message text.

The worker wakes when a transaction that staged rows commits (app/outbox.py `on_commit`, and across processes a
Redis message), and polls every OUTBOX_POLL_SECONDS besides.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import os
import random
import signal
import socket
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any
from uuid import UUID, uuid4
from zoneinfo import ZoneInfo

from prometheus_client import Counter, Gauge
from redis.asyncio import Redis
from sqlalchemy import delete, func, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession
from uuid_utils.compat import uuid7

from app import outbox
from app.accounts.models import Device, User
from app.chat.hub import Presence
from app.consultations.models import Consultation
from app.db import Database, dialect_insert
from app.errors import Unavailable
from app.notifications import reminders
from app.notifications.models import STAFF_TOPICS, OutboxDelivery
from app.notifications.push import Outcome, PushMessage, PushSender, PushTarget
from app.notifications.sms import SmsSender
from app.outbox import OutboxEvent
from app.rtc.models import Call
from app.settings import Settings
from app.tasks import cancel_until_done, set_event_from_any_thread

log = logging.getLogger("app.notifications")
CHANNEL = "clinic:outbox"  # Redis: "rows were committed", heard by every worker

SENT = Counter("clinic_outbox_sent_total", "Pushes and SMS the outbox worker delivered", ["channel"])
RETRIED = Counter("clinic_outbox_retried_total", "Outbox rows put back for another attempt")
FAILED = Counter("clinic_outbox_failed_total", "Outbox rows given up after OUTBOX_MAX_ATTEMPTS")
PENDING_ROWS = Gauge("clinic_outbox_pending", "Outbox rows neither dispatched nor failed")
OLDEST_PENDING = Gauge("clinic_outbox_oldest_pending_seconds", "Age of the oldest outbox row neither dispatched nor "
                       "failed (0 when none): how far behind the worker is")

# consultation.updated changes a patient must hear of; the others they made themselves or see in the app
PATIENT_CHANGES = frozenset({"confirm", "cancel", "move"})
CALL = "call.incoming"  # urgent: never held, pushed regardless of quiet hours
SMS_CONCURRENCY = 10
PASSES_IN_FLIGHT = 2  # one sending while the next claims and plans


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


async def foreground(presence: Presence, user_ids: list[UUID]) -> set[UUID]:
    """Users with a socket in the foreground on any instance (they see events live: no push)."""
    return await presence.foreground(user_ids) if user_ids else set()


# --- quiet hours -----------------------------------------------------------------------------------


def _minutes(hhmm: str) -> int:
    hours, _, minutes = hhmm.partition(":")
    return int(hours) * 60 + int(minutes)


def quiet_until(start: str | None, end: str | None, zone: str, now: dt.datetime) -> dt.datetime | None:
    """When the user's quiet hours end, if `now` is within them (local times in `zone`; may span midnight)."""
    if not start or not end or start == end:
        return None
    try:
        tz = ZoneInfo(zone)
    except (KeyError, ValueError):
        tz = ZoneInfo("UTC")
    local = now.astimezone(tz)
    s, e, t = _minutes(start), _minutes(end), local.hour * 60 + local.minute
    inside = s <= t < e if s < e else (t >= s or t < e)
    if not inside:
        return None
    ends = local.replace(hour=e // 60, minute=e % 60, second=0, microsecond=0)
    if ends <= local:
        ends += dt.timedelta(days=1)
    return ends.astimezone(dt.UTC)


# --- what a pass works with --------------------------------------------------------------------------


@dataclass(slots=True)
class Claimed:
    id: UUID
    type: str
    aggregate_id: UUID | None
    recipients: list[str]
    payload: dict[str, Any]
    attempts: int


@dataclass(slots=True)
class Person:
    id: UUID
    guardian_id: UUID | None
    active: bool
    is_staff: bool
    roles: list[str]
    push_topics: list[str] | None
    quiet_start: str | None
    quiet_end: str | None
    timezone: str
    phone: str | None


@dataclass(slots=True)
class Job:
    """One send: a push to a device, or an SMS to a phone."""

    event_id: UUID
    target: str
    user_id: UUID
    push: tuple[PushMessage, PushTarget] | None = None
    sms: tuple[str, str] | None = None


@dataclass(slots=True)
class Plan:
    jobs: list[Job] = field(default_factory=list)
    held: dict[UUID, dt.datetime] = field(default_factory=dict)  # row -> when its held targets are due


@dataclass(frozen=True, slots=True)
class Meaning:
    """What a row means for its recipients: a push (or nothing), its topic, and for reminders the visit time."""

    push: PushMessage | None
    topic: str
    starts_at: dt.datetime | None = None


def sms_text(starts_at: dt.datetime, zone: str) -> str:
    try:
        local = starts_at.astimezone(ZoneInfo(zone))
    except (KeyError, ValueError):
        local = starts_at
    return f"Напоминание: у вас запись в клинике {local:%d.%m.%Y} в {local:%H:%M}"  # noqa: RUF001


class OutboxWorker:
    def __init__(self, database: Database, settings: Settings, sender: PushSender, sms: SmsSender,
                 presence: Presence, redis: Redis | None = None, owner: str | None = None) -> None:
        self.database = database
        self.settings = settings
        self.sender = sender
        self.sms = sms
        self.presence = presence
        self.redis = redis
        self.owner = owner or f"{socket.gethostname()}:{os.getpid()}:{uuid4().hex[:8]}"
        self.wake = asyncio.Event()
        self.idle = asyncio.Event()  # set while a pass found nothing to do (tests await it)
        self._reminders_at = 0.0
        self._gauge_at = 0.0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping = False

    # --- the loop ---------------------------------------------------------------------------------

    def nudge(self) -> None:
        """Start a pass now; callable from any thread (a commit on another event loop, as in tests)."""
        set_event_from_any_thread(self._loop, self.wake)

    async def run(self) -> None:
        self._loop = asyncio.get_running_loop()
        undo = outbox.on_commit(self.nudge)
        listening = asyncio.create_task(self._listen()) if self.redis is not None else None
        loop = asyncio.get_running_loop()
        # a pass's sends and records go on while the next pass claims and plans (other rows: the first ones are
        # leased); at most PASSES_IN_FLIGHT at once
        delivering: set[asyncio.Task[None]] = set()
        room = asyncio.Semaphore(PASSES_IN_FLIGHT)

        def delivered(task: asyncio.Task[None]) -> None:
            delivering.discard(task)
            room.release()
            self.wake.set()  # a pass after it: what it put back due now, and `idle` once nothing is left
            if not task.cancelled() and task.exception() is not None:
                log.error("outbox pass failed", exc_info=task.exception())

        try:
            while True:
                self.wake.clear()
                try:
                    if loop.time() >= self._reminders_at:  # reminders fall due by the clock, not by a commit
                        self._reminders_at = loop.time() + self.settings.outbox_poll_seconds
                        await self.stage_reminders()
                    await room.acquire()
                    try:
                        taken = await self._take()
                    except BaseException:
                        room.release()
                        raise
                    if taken is None:
                        room.release()
                    else:
                        task = asyncio.create_task(self._deliver(*taken))
                        delivering.add(task)
                        task.add_done_callback(delivered)
                    if loop.time() >= self._gauge_at:
                        self._gauge_at = loop.time() + self.settings.outbox_poll_seconds
                        await self.measure()
                    count = len(taken[0]) if taken is not None else 0
                except asyncio.CancelledError:
                    raise
                except Exception:  # a database or provider hiccup must not end the loop
                    log.exception("outbox pass failed")
                    count = 0
                    await asyncio.sleep(min(1.0, self.settings.outbox_poll_seconds))
                if count >= self.settings.outbox_batch_size:
                    continue  # a backlog: take the next batch at once
                if count == 0 and not delivering:
                    self.idle.set()
                else:
                    self.idle.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.wake.wait(), self.settings.outbox_poll_seconds)
        finally:
            undo()
            self._stopping = True  # the listener ends even if its cancellation is swallowed (app/tasks.py)
            for task in list(delivering):
                await cancel_until_done(task)
            if listening is not None:
                await cancel_until_done(listening)

    async def _listen(self) -> None:
        assert self.redis is not None
        while True:
            try:
                async with self.redis.pubsub(ignore_subscribe_messages=True) as pubsub:
                    await pubsub.subscribe(CHANNEL)
                    self.wake.set()  # (re)subscribed: rows committed meanwhile are looked for now
                    async for message in pubsub.listen():
                        if message.get("type") == "message":
                            self.wake.set()
            except asyncio.CancelledError:
                raise
            except Exception:
                if self._stopping:
                    return
                log.warning("outbox wake-up subscription lost; polling meanwhile", exc_info=True)
                await asyncio.sleep(1.0)

    async def stage_reminders(self) -> int:
        total = 0
        while True:
            async with self.database.writer() as session:
                staged = await reminders.stage_due(session, utcnow())
                await session.commit()
            total += staged
            if staged < 500:
                return total

    async def measure(self) -> None:
        async with self.database.reader() as session:
            pending, oldest = (await session.execute(
                select(func.count(), func.min(OutboxEvent.created_at)).select_from(OutboxEvent).where(
                    OutboxEvent.dispatched_at.is_(None), OutboxEvent.failed_at.is_(None)))).one()
        PENDING_ROWS.set(pending or 0)
        OLDEST_PENDING.set(max(0.0, (utcnow() - oldest).total_seconds()) if oldest is not None else 0.0)

    # --- one pass -----------------------------------------------------------------------------------

    async def drain_once(self) -> int:
        """Claim a batch of due rows, send what they mean, record the outcomes. Returns how many rows."""
        taken = await self._take()
        if taken is None:
            return 0
        await self._deliver(*taken)
        return len(taken[0])

    async def _take(self) -> tuple[list[Claimed], Plan] | None:
        """A batch of due rows claimed (and leased), and who gets what; None: nothing is due."""
        now = utcnow()
        async with self.database.writer() as session:
            rows = await self._claim(session, now)
            await session.commit()
        if not rows:
            return None
        async with self.database.reader() as session:
            return rows, await self._plan(session, rows, now)

    async def _deliver(self, rows: list[Claimed], plan: Plan) -> None:
        """The plan's sends, then their outcomes recorded and the rows released."""
        outcomes = await self._send(plan.jobs)
        async with self.database.writer() as session:
            await self._record(session, rows, plan, outcomes)
            await session.commit()

    async def _claim(self, session: AsyncSession, now: dt.datetime) -> list[Claimed]:
        lease = now + dt.timedelta(seconds=self.settings.outbox_lease_seconds)
        due = (OutboxEvent.dispatched_at.is_(None), OutboxEvent.failed_at.is_(None),
               OutboxEvent.next_attempt_at <= now)
        # a materialized CTE: evaluated once (an IN subquery may be re-run by the planner, each run locking and
        # adding other rows past the LIMIT); the conditions again on the UPDATE, so a row another worker claimed
        # meanwhile no longer matches
        batch = (select(OutboxEvent.id).where(*due).order_by(OutboxEvent.next_attempt_at)
                 .limit(self.settings.outbox_batch_size).with_for_update(skip_locked=True)
                 .cte("batch").prefix_with("MATERIALIZED"))
        claimed = await session.execute(
            update(OutboxEvent).where(OutboxEvent.id == batch.c.id, *due)
            .values(next_attempt_at=lease, lease_until=lease, lease_owner=self.owner,
                    attempts=OutboxEvent.attempts + 1)
            .returning(OutboxEvent.id, OutboxEvent.type, OutboxEvent.aggregate_id, OutboxEvent.recipients,
                       OutboxEvent.payload, OutboxEvent.attempts)
            .execution_options(synchronize_session=False))
        return [Claimed(r.id, r.type, r.aggregate_id, list(r.recipients or []), dict(r.payload or {}), r.attempts)
                for r in claimed]

    def _meaning(self, row: Claimed, visits: dict[UUID, tuple[str, dt.datetime]], over: set[UUID],
                 now: dt.datetime) -> Meaning:
        key = row.id.hex  # the same on every retry of this row: the phone shows it once
        if row.type == "push":
            ref = str(row.payload.get("ref") or row.aggregate_id)
            return Meaning(PushMessage(type="message.new", ref=ref, collapse_key=key), "chat")
        if row.type == CALL:
            # a call answered or ended never rings a phone; nor one past its ring window, and the push lives only
            # for the ring time left (FCM ttl, apns-expiration), so a late delivery cannot ring either
            left = float(self.settings.call_ring_seconds)
            with contextlib.suppress(TypeError, ValueError):
                left = (dt.datetime.fromisoformat(str(row.payload.get("ring_until"))) - now).total_seconds()
            if row.aggregate_id in over or left < 1:
                return Meaning(None, "chat")
            return Meaning(PushMessage(type=CALL, ref=str(row.payload.get("ref") or row.aggregate_id),
                                       collapse_key=key, urgent=True,
                                       ttl_seconds=min(int(left), self.settings.call_ring_seconds)), "chat")
        if row.type == "notice":
            topic = "alerts" if row.payload.get("kind") == "low_rating" else "notices"
            return Meaning(PushMessage(type="notice", ref=str(row.aggregate_id), collapse_key=key), topic)
        if row.type == "consultation.updated":
            if row.payload.get("change") not in PATIENT_CHANGES:
                return Meaning(None, "consultations")
            return Meaning(PushMessage(type="notice", ref=str(row.aggregate_id), collapse_key=key), "consultations")
        if row.type == "reminder" and row.aggregate_id is not None:
            visit = visits.get(row.aggregate_id)
            starts_at = dt.datetime.fromisoformat(str(row.payload.get("starts_at")))
            # cancelled or moved since it was staged: this reminder is void (a moved visit has its own)
            if visit is None or visit[0] not in reminders.LIVE or visit[1] != starts_at:
                return Meaning(None, "reminders")
            return Meaning(PushMessage(type="reminder", ref=str(row.aggregate_id), collapse_key=key),
                           "reminders", starts_at)
        return Meaning(None, "notices")  # a type with nothing to push

    async def _plan(self, session: AsyncSession, rows: list[Claimed], now: dt.datetime) -> Plan:
        plan = Plan()
        visit_ids = [r.aggregate_id for r in rows if r.type == "reminder" and r.aggregate_id is not None]
        visits = {v.id: (v.status, v.starts_at) for v in (await session.execute(
            select(Consultation.id, Consultation.status, Consultation.starts_at)
            .where(Consultation.id.in_(visit_ids)))).all()} if visit_ids else {}
        call_ids = [r.aggregate_id for r in rows if r.type == CALL and r.aggregate_id is not None]
        over = set((await session.scalars(select(Call.id).where(
            Call.id.in_(call_ids), Call.state != "ringing"))).all()) if call_ids else set()
        meanings = {r.id: self._meaning(r, visits, over, now) for r in rows}
        live = [r for r in rows if meanings[r.id].push is not None]
        if not live:
            return plan
        people = await self._people(session, live)
        by_role: dict[str, list[UUID]] = {}
        if any(x.startswith("role:") for r in live for x in r.recipients):
            for member in (await self._staff(session)).values():
                people.setdefault(member.id, member)
                for role in member.roles:
                    by_role.setdefault(role, []).append(member.id)
        # each row's final recipients: roles resolved, dependents to their guardian, opt-ins applied
        targets: dict[UUID, list[Person]] = {}
        for row in live:
            meaning = meanings[row.id]
            chosen: dict[UUID, Person] = {}
            for recipient in row.recipients:
                ids = by_role.get(recipient[5:], []) if recipient.startswith("role:") else [_uuid(recipient)]
                for uid in ids:
                    person: Person | None = people.get(uid) if uid is not None else None
                    if person is not None and person.guardian_id is not None:
                        person = people.get(person.guardian_id)
                    if person is None or not person.active:
                        continue
                    if person.is_staff and meaning.topic not in (person.push_topics
                                                                 if person.push_topics is not None else STAFF_TOPICS):
                        continue
                    chosen[person.id] = person
            targets[row.id] = list(chosen.values())
        everyone = sorted({p.id for ps in targets.values() for p in ps})
        asking = asyncio.ensure_future(foreground(self.presence, everyone))  # Redis, while the database answers
        try:
            done = await self._done(session, [r.id for r in live])
            devices = await self._devices(session, everyone)
        finally:
            seen = await asking
        for row in live:
            meaning = meanings[row.id]
            assert meaning.push is not None
            for person in targets[row.id]:
                if not meaning.push.urgent:
                    if person.id in seen:
                        continue  # a socket in the foreground had it live
                    until = quiet_until(person.quiet_start, person.quiet_end, person.timezone, now)
                    # a reminder held past its visit would be useless: it goes now
                    if until is not None and not (meaning.starts_at is not None and until >= meaning.starts_at):
                        plan.held[row.id] = min(until, plan.held.get(row.id, until))
                        continue
                mine = devices.get(person.id, [])
                for device in mine:
                    target = f"push:{device.device_id}"
                    if (row.id, target) not in done:
                        plan.jobs.append(Job(row.id, target, person.id, push=(meaning.push, device)))
                if not mine and meaning.starts_at is not None and person.phone:  # a reminder without an app
                    target = f"sms:{person.id}"
                    if (row.id, target) not in done:
                        plan.jobs.append(Job(row.id, target, person.id,
                                             sms=(person.phone, sms_text(meaning.starts_at, person.timezone))))
        return plan

    async def _people(self, session: AsyncSession, rows: list[Claimed]) -> dict[UUID, Person]:
        ids = {u for r in rows for x in r.recipients if not x.startswith("role:") and (u := _uuid(x)) is not None}
        if not ids:
            return {}
        query = _person_query().where(or_(User.id.in_(ids),  # and the guardians of dependents among them
                                          User.id.in_(select(User.guardian_id).where(User.id.in_(ids)))))
        return {p.id: p for p in _persons(await session.execute(query))}

    async def _staff(self, session: AsyncSession) -> dict[UUID, Person]:
        return {p.id: p for p in _persons(await session.execute(
            _person_query().where(User.is_staff.is_(True), User.active.is_(True))))}

    async def _done(self, session: AsyncSession, event_ids: list[UUID]) -> set[tuple[UUID, str]]:
        rows = await session.execute(select(OutboxDelivery.event_id, OutboxDelivery.target).where(
            OutboxDelivery.event_id.in_(event_ids), OutboxDelivery.state.in_(("sent", "gone", "failed"))))
        return {(r.event_id, r.target) for r in rows}

    async def _devices(self, session: AsyncSession, user_ids: list[UUID]) -> dict[UUID, list[PushTarget]]:
        if not user_ids:
            return {}
        found: dict[UUID, list[PushTarget]] = {}
        for d in (await session.execute(select(Device.id, Device.user_id, Device.platform, Device.push_token,
                                                      Device.voip_token).where(Device.user_id.in_(user_ids)))).all():
            found.setdefault(d.user_id, []).append(PushTarget(device_id=d.id, user_id=d.user_id, platform=d.platform,
                                                              push_token=d.push_token, voip_token=d.voip_token))
        return found

    async def _send(self, jobs: list[Job]) -> list[Outcome]:
        outcomes = [Outcome.RETRY] * len(jobs)
        pushes = [(i, j.push) for i, j in enumerate(jobs) if j.push is not None]
        texts = [(i, j.sms) for i, j in enumerate(jobs) if j.sms is not None]
        gate = asyncio.Semaphore(SMS_CONCURRENCY)
        # every send of the pass ends within half the lease, so no other worker takes the rows over (and sends them
        # again) while this one still waits; what has not gone by then is tried again later
        deadline = asyncio.get_running_loop().time() + self.settings.outbox_lease_seconds / 2

        async def text(to: str, body: str) -> Outcome:
            try:
                async with asyncio.timeout_at(deadline), gate:
                    await self.sms.send(to, body)
                    return Outcome.SENT
            except TimeoutError:  # not sent, or its answer lost: at most once more
                log.warning("a reminder SMS did not go out within the lease")
                return Outcome.RETRY
            except Unavailable as exc:  # refused: retrying the same text will not help
                return Outcome.FAILED if exc.extra.get("reason") == "sms_failed" else Outcome.RETRY
            except Exception:
                log.warning("sending a reminder SMS failed", exc_info=True)
                return Outcome.RETRY

        async def push_all() -> list[Outcome]:
            if not pushes:
                return []
            try:
                async with asyncio.timeout_at(deadline):
                    return list(await self.sender.send([p for _, p in pushes]))
            except TimeoutError:  # the answer is lost: sent again later with the same collapse key
                log.warning("push provider did not answer in time", extra={"pushes": len(pushes)})
            except Exception:
                log.exception("push sender failed")
            return [Outcome.RETRY] * len(pushes)

        pushed, texted = await asyncio.gather(push_all(), asyncio.gather(*(text(*s) for _, s in texts)))
        for (i, _), outcome in zip(pushes, pushed, strict=True):
            outcomes[i] = outcome
        for (i, _), outcome in zip(texts, texted, strict=True):
            outcomes[i] = outcome
        return outcomes

    async def _record(self, session: AsyncSession, rows: list[Claimed], plan: Plan,
                      outcomes: Sequence[Outcome]) -> None:
        now = utcnow()
        if plan.jobs:
            table = OutboxDelivery.__table__
            insert = dialect_insert(session)(table)
            await session.execute(insert.on_conflict_do_update(
                index_elements=["event_id", "target"],
                set_={"state": insert.excluded.state, "attempts": table.c.attempts + 1,
                      "sent_at": insert.excluded.sent_at, "updated_at": insert.excluded.updated_at}),
                [{"id": uuid7(), "event_id": j.event_id, "target": j.target, "user_id": j.user_id, "state": o.value,
                  "attempts": 1, "sent_at": now if o is Outcome.SENT else None, "created_at": now, "updated_at": now}
                 for j, o in zip(plan.jobs, outcomes, strict=True)])
            gone = [j.push[1].device_id for j, o in zip(plan.jobs, outcomes, strict=True)
                    if o is Outcome.GONE and j.push is not None]
            if gone:
                await session.execute(delete(Device).where(Device.id.in_(gone)))
            voip_gone = [j.push[1].device_id for j, o in zip(plan.jobs, outcomes, strict=True)
                         if o is Outcome.VOIP_GONE and j.push is not None]
            if voip_gone:  # the phone still gets its other pushes; calls then ring through FCM
                await session.execute(update(Device).where(Device.id.in_(voip_gone)).values(voip_token=None)
                                      .execution_options(synchronize_session=False))
            for j, o in zip(plan.jobs, outcomes, strict=True):
                if o is Outcome.SENT:
                    SENT.labels("push" if j.push is not None else "sms").inc()
        retrying = {j.event_id for j, o in zip(plan.jobs, outcomes, strict=True) if o is Outcome.RETRY}
        mine = (OutboxEvent.lease_owner == self.owner,)  # a row taken over meanwhile is its new owner's
        finished = [r.id for r in rows if r.id not in retrying and r.id not in plan.held]
        if finished:
            await session.execute(update(OutboxEvent).where(OutboxEvent.id.in_(finished), *mine).values(
                dispatched_at=now, lease_until=None, lease_owner=None, updated_at=now)
                .execution_options(synchronize_session=False))
        for row in rows:
            if row.id in finished:
                continue
            values: dict[str, Any] = {"lease_until": None, "lease_owner": None, "updated_at": now}
            if row.id in retrying and row.attempts >= self.settings.outbox_max_attempts:
                values.update(failed_at=now, last_error=f"not delivered to every target after {row.attempts} attempts")
                FAILED.inc()
                log.warning("outbox row failed", extra={"event_id": str(row.id), "type": row.type})
            else:
                due = plan.held.get(row.id)
                if row.id in retrying:
                    RETRIED.inc()
                    values["last_error"] = "a target's send is to be retried"
                    backoff = self.settings.outbox_retry_base_seconds * 2 ** (row.attempts - 1)
                    retry_at = now + dt.timedelta(seconds=backoff * random.uniform(0.5, 1.5))
                    due = retry_at if due is None else min(due, retry_at)
                else:  # only held for quiet hours: that was no attempt
                    values["attempts"] = OutboxEvent.attempts - 1
                values["next_attempt_at"] = due
            await session.execute(update(OutboxEvent).where(OutboxEvent.id == row.id, *mine).values(**values)
                                  .execution_options(synchronize_session=False))


def _uuid(text: str) -> UUID | None:
    try:
        return UUID(text)
    except ValueError:
        return None


def _person_query() -> Any:
    return select(User.id, User.guardian_id, User.active, User.is_staff, User.roles, User.push_topics,
                  User.quiet_hours_start, User.quiet_hours_end, User.timezone, User.phone)


def _persons(rows: Iterable[Any]) -> list[Person]:
    return [Person(r.id, r.guardian_id, r.active, r.is_staff, list(r.roles or []), r.push_topics,
                   r.quiet_hours_start, r.quiet_hours_end, r.timezone, r.phone) for r in rows]


# --- waking workers in other processes -------------------------------------------------------------


class RedisNudge:
    """An outbox commit's wake-up for workers in other processes: one small publish at a time, coalesced (the
    commits during a publish are covered by one more after it), so a busy API sends few."""

    def __init__(self, redis: Redis) -> None:
        self.redis = redis
        self._loop = asyncio.get_running_loop()  # the Redis client's: a commit on another loop defers to it
        self._dirty = False
        self._task: asyncio.Task[None] | None = None

    def __call__(self) -> None:
        try:
            here = asyncio.get_running_loop() is self._loop
        except RuntimeError:
            here = False
        if not here:
            with contextlib.suppress(RuntimeError):  # that loop has closed: nobody to wake
                self._loop.call_soon_threadsafe(self)
            return
        self._dirty = True
        if self._task is None or self._task.done():
            self._task = self._loop.create_task(self._publish())

    async def _publish(self) -> None:
        while self._dirty:
            self._dirty = False
            try:
                await self.redis.publish(CHANNEL, b"1")
            except Exception:  # the workers' poll finds the rows anyway
                log.warning("outbox wake-up publish failed", exc_info=True)
                return


# --- the admin's view of rows given up -------------------------------------------------------------


async def failed_events(session: AsyncSession, limit: int, cursor: UUID | None) -> list[OutboxEvent]:
    query = select(OutboxEvent).where(OutboxEvent.failed_at.is_not(None)).order_by(OutboxEvent.id.desc())
    if cursor is not None:
        query = query.where(OutboxEvent.id < cursor)
    return list((await session.scalars(query.limit(limit + 1))).all())


# --- `python -m app worker` ------------------------------------------------------------------------


async def run_worker(settings: Settings) -> None:
    """The worker as a process of its own (PostgreSQL; Redis for presence and wake-ups), until SIGTERM/SIGINT."""
    from app.chat.hub import RedisPresence
    from app.notifications.push import push_sender
    from app.notifications.sms import sms_sender
    from app.observability import serve_metrics

    database = Database(settings)
    redis = Redis.from_url(settings.redis_url) if settings.redis_url else None
    presence: Presence
    if redis is not None:
        presence = RedisPresence(redis, settings.ws_heartbeat_seconds * 2)
    else:
        from app.chat.hub import InProcessPresence
        presence = InProcessPresence(settings.ws_heartbeat_seconds * 2)
    sender = push_sender(settings)
    sms = sms_sender(settings)
    worker = OutboxWorker(database, settings, sender, sms, presence, redis)
    metrics = await serve_metrics(settings.metrics_address, settings.metrics_token) if settings.metrics_address \
        else None
    task = asyncio.create_task(worker.run())
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, task.cancel)
    log.info("outbox worker started", extra={"owner": worker.owner})
    try:
        with contextlib.suppress(asyncio.CancelledError):
            await task
    finally:
        if metrics is not None:
            metrics.close()
        await sender.aclose()
        await sms.aclose()
        if redis is not None:
            await redis.aclose()
        await database.dispose()
