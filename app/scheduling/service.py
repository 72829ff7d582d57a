"""Scheduling rules: the catalogue, schedules and their slots, holds, claiming a slot, the waitlist, the feed."""

from __future__ import annotations

import bisect
import datetime as dt
import hashlib
import time
from dataclasses import dataclass
from typing import Any
from uuid import UUID
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import msgspec
from sqlalchemy import and_, delete, func, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession
from uuid_utils.compat import uuid7

from app import access, outbox
from app.access import Viewer
from app.accounts.models import User
from app.accounts.service import age_on
from app.chat import streams
from app.db import dialect_insert, insert_ignoring_duplicates
from app.errors import Conflict, Invalid, NotVisible
from app.scheduling.calendar import slot_times, valid_hours
from app.scheduling.models import ClinicService, Schedule, Slot, SpecialtyRule, WaitlistRequest
from app.scheduling.schemas import RulesIn, ScheduleIn, ServiceIn
from app.schemas import money_ok
from app.settings import Settings
from app.specialties import TITLES, Specialty


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def is_free(now: dt.datetime) -> Any:
    """SQL: the slot is neither booked nor under a live hold."""
    return and_(Slot.consultation_id.is_(None), or_(Slot.held_until.is_(None), Slot.held_until <= now))


@dataclass
class FeedCache:
    """The partner feed per query, kept a few seconds: heavy polling costs one query per window."""

    seconds: float
    entries: dict[tuple[Any, ...], tuple[float, bytes, str]]

    def get(self, key: tuple[Any, ...]) -> tuple[bytes, str] | None:
        hit = self.entries.get(key)
        return (hit[1], hit[2]) if hit and hit[0] > time.monotonic() else None

    def put(self, key: tuple[Any, ...], body: bytes) -> str:
        etag = '"' + hashlib.blake2b(body, digest_size=16).hexdigest() + '"'
        if len(self.entries) > 1000:
            self.entries.clear()
        self.entries[key] = (time.monotonic() + self.seconds, body, etag)
        return etag


@dataclass
class RulesCache:
    """The directions' rules, kept a few seconds: the public catalogue reads them on every call, admins rarely
    change them. A change clears this process's copy; other instances catch up within `seconds`."""

    seconds: float
    value: tuple[float, Any] | None = None

    def get(self) -> Any | None:
        return self.value[1] if self.value and self.value[0] > time.monotonic() else None

    def put(self, value: Any) -> None:
        self.value = (time.monotonic() + self.seconds, value)

    def clear(self) -> None:
        self.value = None


class SchedulingService:
    def __init__(self, session: AsyncSession, settings: Settings) -> None:
        self.session = session
        self.settings = settings

    # --- catalogue -----------------------------------------------------------------------------

    async def services(self, specialty: str | None) -> list[ClinicService]:
        query = select(ClinicService).where(ClinicService.active.is_(True)).order_by(ClinicService.specialty,
                                                                                     ClinicService.title)
        if specialty:
            query = query.where(ClinicService.specialty == specialty)
        return list((await self.session.scalars(query)).all())

    async def create_service(self, data: ServiceIn) -> ClinicService:
        if not money_ok(data.price):
            raise Invalid("a price is 0 to 10,000,000 with at most two decimals", "price_invalid")
        service = ClinicService(specialty=data.specialty.value, title=data.title.strip(),
                                duration_minutes=data.duration_minutes, price=data.price,
                                in_person_only=data.in_person_only, stage=data.stage.value)
        self.session.add(service)
        await self.session.flush()
        return service

    async def specialty_rules(self) -> dict[str, SpecialtyRule]:
        return {r.specialty: r for r in (await self.session.scalars(select(SpecialtyRule))).all()}

    async def set_specialty_rules(self, specialty: Specialty, data: RulesIn) -> SpecialtyRule:
        if data.min_age is not None and data.max_age is not None and data.min_age > data.max_age:
            raise Invalid("min_age is at most max_age", "rules_invalid")
        values = {"min_age": data.min_age, "max_age": data.max_age, "sex": data.sex.value if data.sex else None}
        now = utcnow()
        upsert = dialect_insert(self.session)(SpecialtyRule)  # one row per direction, also when two admins race
        await self.session.execute(upsert.values(id=uuid7(), specialty=specialty.value, created_at=now, updated_at=now,
                                                 **values)
                                   .on_conflict_do_update(index_elements=["specialty"],
                                                          set_={**values, "updated_at": now}))
        rule = await self.session.scalar(select(SpecialtyRule).where(SpecialtyRule.specialty == specialty.value)
                                         .execution_options(populate_existing=True))
        assert rule is not None
        return rule

    async def check_serves(self, specialty: str, patient: User, starts_at: dt.datetime) -> None:
        """The direction's rule on whom it serves, for this patient on the day of the visit."""
        rule = await self.session.scalar(select(SpecialtyRule).where(SpecialtyRule.specialty == specialty))
        if rule is not None:
            refuse_unless_served(specialty, rule.min_age, rule.max_age, rule.sex, patient.birth_date, patient.sex,
                                 starts_at, self.settings.clinic_timezone)

    async def one_at_a_time(self, person_id: UUID) -> User:
        """Lock the person's row until commit, so their bookings and holds are checked one after another.

        FOR NO KEY UPDATE: it queues other bookers of this person, not rows that merely refer to them. SQLite
        has no row locks; there the first write of a transaction takes the one writer's lock, which callers
        rely on by checking counts after their own write."""
        person = await self.session.scalar(select(User).where(User.id == person_id).with_for_update(key_share=True))
        if person is None:
            raise NotVisible("patient not found")
        return person

    async def service(self, service_id: UUID) -> ClinicService:
        service = await self.session.get(ClinicService, service_id)
        if service is None or not service.active:
            raise Invalid("no such service", "service_unknown")
        return service

    # --- schedules and slots -------------------------------------------------------------------

    async def schedule_of(self, specialist_id: UUID) -> Schedule | None:
        return await self.session.scalar(select(Schedule).where(Schedule.specialist_id == specialist_id))

    async def set_schedule(self, specialist: User, data: ScheduleIn) -> tuple[Schedule, int, int]:
        """Store the week and bring future slots in line with it; booked and held slots always stay."""
        weekly = [msgspec.to_builtins(w) for w in data.weekly]
        breaks = [msgspec.to_builtins(b) for b in data.breaks]
        if not valid_hours(weekly) or not valid_hours(breaks):
            raise Invalid("each interval must start before it ends", "hours_invalid")
        _zone(data.timezone)
        schedule = await self.schedule_of(specialist.id)
        if schedule is None:
            schedule = Schedule(specialist_id=specialist.id)
            self.session.add(schedule)
        schedule.timezone, schedule.slot_minutes, schedule.horizon_days = (data.timezone, data.slot_minutes,
                                                                           data.horizon_days)
        schedule.weekly, schedule.breaks = weekly, breaks
        first_new, created, removed = await self._sync_slots(schedule, prune=True)
        if first_new is not None:
            await self.announce_free(specialist, first_new["id"], first_new["starts_at"])
        return schedule, created, removed

    async def _sync_slots(self, schedule: Schedule, *,
                          prune: bool) -> tuple[dict[str, Any] | None, int, int]:
        """Create the schedule's missing slots up to its horizon; with prune, drop free ones it no longer has.

        Returns the first new slot (its row), how many were created and how many removed."""
        now = utcnow()
        first_day = now.astimezone(_zone(schedule.timezone)).date()
        wanted = {start: end for start, end in slot_times(schedule.timezone, schedule.weekly, schedule.breaks,
                                                           schedule.slot_minutes, first_day, schedule.horizon_days + 1)
                  if start > now}
        existing = (await self.session.execute(
            select(Slot.id, Slot.starts_at, Slot.ends_at, Slot.consultation_id, Slot.held_until)
            .where(Slot.specialist_id == schedule.specialist_id, Slot.ends_at > now))).all()
        if prune:
            keep = [s for s in existing if s.consultation_id is not None or (s.held_until and s.held_until > now)
                    or wanted.get(s.starts_at) == s.ends_at]
            drop = [s.id for s in existing if s.id not in {k.id for k in keep}]
            if drop:  # a slot booked or held meanwhile survives: the delete re-checks it is free
                await self.session.execute(delete(Slot).where(Slot.id.in_(drop), is_free(now)))
        else:
            keep, drop = list(existing), []
        kept = sorted((s.starts_at, s.ends_at) for s in keep)
        kept_starts = [a for a, _ in kept]
        rows: list[dict[str, Any]] = []
        for start, end in sorted(wanted.items()):
            i = bisect.bisect_left(kept_starts, end)  # kept slots starting before this one ends ...
            if i and kept[i - 1][1] > start:  # ... and the latest of them still running: overlap, skip
                continue
            rows.append({"id": uuid7(), "specialist_id": schedule.specialist_id, "starts_at": start, "ends_at": end,
                         "created_at": now, "updated_at": now})
        created = await insert_ignoring_duplicates(self.session, Slot, rows)
        return (rows[0] if rows else None), created, len(drop)

    async def extend_horizons(self) -> int:
        """Keep every schedule's slots reaching its horizon as days pass; safe to run on many instances."""
        created = 0
        for schedule in (await self.session.scalars(select(Schedule))).all():
            created += (await self._sync_slots(schedule, prune=False))[1]
            await self.session.commit()
        return created

    async def slot(self, slot_id: UUID) -> Slot:
        slot = await self.session.get(Slot, slot_id)
        if slot is None:
            raise NotVisible("slot not found")
        return slot

    async def hold(self, slot_id: UUID, viewer: Viewer) -> tuple[UUID, dt.datetime]:
        """Hold a slot for a few minutes. A patient holds a fair share: at most `holds_per_patient` at once, and
        holding again what one holds answers the same hold, which ends when it always did."""
        limited = not viewer.has_any(access.BOOKERS_FOR_OTHERS)  # the front desk holds for many callers
        if limited:
            await self.one_at_a_time(viewer.id)
        now = utcnow()
        own = (await self.session.execute(select(Slot.hold_id, Slot.held_until).where(
            Slot.id == slot_id, Slot.held_by == viewer.id, Slot.held_until > now,
            Slot.consultation_id.is_(None)))).one_or_none()
        if own is not None and own.hold_id is not None and own.held_until is not None:
            return own.hold_id, own.held_until
        hold_id, until = uuid7(), now + dt.timedelta(seconds=self.settings.hold_seconds)
        held = await self.session.execute(
            update(Slot).where(Slot.id == slot_id, Slot.starts_at > now, is_free(now))
            .values(hold_id=hold_id, held_by=viewer.id, held_until=until).returning(Slot.id))
        if held.one_or_none() is None:
            await self.slot(slot_id)  # 404 when it does not exist at all
            raise Conflict("the slot is taken or held by someone else", "slot_taken")
        if limited:  # counted after our own write, under the lock above: parallel holds cannot pass the limit
            live = await self.session.scalar(select(func.count()).select_from(Slot).where(
                Slot.held_by == viewer.id, Slot.held_until > now, Slot.consultation_id.is_(None)))
            if (live or 0) > self.settings.holds_per_patient:
                raise Conflict(f"at most {self.settings.holds_per_patient} slots may be held at once: book one "
                               "or let a hold expire", "too_many_holds", limit=self.settings.holds_per_patient)
        return hold_id, until

    async def release(self, slot_id: UUID, consultation_id: UUID) -> None:
        await self.session.execute(update(Slot).where(Slot.id == slot_id, Slot.consultation_id == consultation_id)
                                   .values(consultation_id=None))

    # --- waitlist ------------------------------------------------------------------------------

    async def add_to_waitlist(self, patient_id: UUID, viewer: Viewer, specialty: str,
                              specialist_id: UUID | None, note: str) -> WaitlistRequest:
        waiting = await self.session.scalar(select(func.count()).select_from(WaitlistRequest).where(
            WaitlistRequest.patient_id == patient_id, WaitlistRequest.status == "open"))
        if (waiting or 0) >= self.settings.waitlist_per_patient:
            raise Conflict(f"a patient has at most {self.settings.waitlist_per_patient} open waitlist requests",
                           "too_many_waitlist_requests", limit=self.settings.waitlist_per_patient)
        request = WaitlistRequest(patient_id=patient_id, requested_by=viewer.id, specialty=specialty,
                                  specialist_id=specialist_id, note=note.strip())
        self.session.add(request)
        await self.session.flush()
        return request

    async def waitlist(self, viewer: Viewer, acted_for: list[UUID], status: str | None, limit: int,
                       cursor: UUID | None) -> list[WaitlistRequest]:
        """The front desk sees every request; a patient those of `acted_for` (themselves and their dependents)."""
        query = select(WaitlistRequest).order_by(WaitlistRequest.id).limit(limit + 1)
        if not viewer.has_any(access.BOOKERS_FOR_OTHERS):
            query = query.where(WaitlistRequest.patient_id.in_(acted_for))
        if status:
            query = query.where(WaitlistRequest.status == status)
        if cursor:
            query = query.where(WaitlistRequest.id > cursor)
        return list((await self.session.scalars(query)).all())

    async def withdraw_from_waitlist(self, request_id: UUID, viewer: Viewer, acted_for: list[UUID]) -> None:
        """The patient takes back their own (or a dependent's: `acted_for`) request; again is no change."""
        request = await self.session.scalar(select(WaitlistRequest).where(
            WaitlistRequest.id == request_id, WaitlistRequest.patient_id.in_(acted_for)))
        if request is None:
            raise NotVisible("waitlist request not found")
        if request.status == "withdrawn":
            return
        if request.status != "open":
            raise Conflict("this request was already resolved by the clinic", "waitlist_resolved")
        request.status, request.resolved_by = "withdrawn", viewer.id
        await self.session.flush()

    async def resolve_waitlist(self, request_id: UUID, viewer: Viewer, resolution: str) -> WaitlistRequest:
        request = await self.session.get(WaitlistRequest, request_id)
        if request is None:
            raise NotVisible("waitlist request not found")
        if request.status != "open":
            raise Conflict("already resolved", "waitlist_resolved")
        request.status, request.resolved_by, request.resolution = "resolved", viewer.id, resolution.strip()
        await self.session.flush()
        return request

    async def announce_free(self, specialist: User, slot_id: UUID, starts_at: dt.datetime) -> int:
        """Tell open waitlist requests that match this specialist that a slot has opened: a `notice` live to the
        patient's, their guardian's (a dependent has no app of their own) and the requester's apps (published
        after commit), and through the outbox."""
        matching = (await self.session.execute(
            select(WaitlistRequest, User.guardian_id).join(User, User.id == WaitlistRequest.patient_id).where(
                WaitlistRequest.status == "open",
                or_(WaitlistRequest.specialist_id == specialist.id,
                    and_(WaitlistRequest.specialist_id.is_(None),
                         WaitlistRequest.specialty.in_(specialist.specialties))),
            ))).all()
        now = utcnow()
        live: list[tuple[set[UUID], str, dict[str, Any]]] = []
        for request, guardian_id in matching:
            request.notified_at = now
            people = {request.patient_id, request.requested_by, *([guardian_id] if guardian_id else [])}
            notice = {"kind": "waitlist_slot_available", "waitlist_id": str(request.id),
                      "specialist_id": str(specialist.id), "slot_id": str(slot_id), "starts_at": starts_at.isoformat()}
            outbox.stage(self.session, "notice", request.id, sorted(str(p) for p in people), notice)
            live.append((people, "notice", notice))
        await streams.append_many(self.session, streams.staged_for(self.session), live)
        return len(matching)


def refuse_unless_served(specialty: str, min_age: int | None, max_age: int | None, sex: str | None,
                         birth_date: dt.date | None, patient_sex: str | None, starts_at: dt.datetime,
                         clinic_timezone: str) -> None:
    """A direction's rule (an age range on the day of the visit, a sex) against the patient's card."""
    title = TITLES[Specialty(specialty)]
    if min_age is not None or max_age is not None:
        if birth_date is None:
            raise Invalid(f"{title} serves patients by age: the patient's birth date is needed",
                          "birth_date_required")
        age = age_on(birth_date, starts_at.astimezone(_zone(clinic_timezone)).date())
        if min_age is not None and age < min_age:
            raise Invalid(f"{title} serves patients aged {min_age} and over", "patient_too_young", min_age=min_age)
        if max_age is not None and age > max_age:
            raise Invalid(f"{title} serves patients aged up to {max_age}", "patient_too_old", max_age=max_age)
    if sex is not None:
        if patient_sex is None:
            raise Invalid(f"{title} serves {sex} patients: the patient's sex is needed", "sex_required")
        if patient_sex != sex:
            raise Invalid(f"{title} serves {sex} patients only", "patient_sex_not_served", sex=sex)


def _zone(name: str) -> ZoneInfo:
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise Invalid("unknown time zone", "timezone_invalid") from exc
