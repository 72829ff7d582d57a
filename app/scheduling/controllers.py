"""Thin HTTP handlers for the catalogue, schedules, slots, holds, the partner feed and the waitlist."""

from __future__ import annotations

from typing import Annotated, Any, Literal
from uuid import UUID

from litestar import Controller, Request, Response, delete, get, post, put
from litestar.datastructures import State
from litestar.di import NamedDependency, Provide
from litestar.openapi.datastructures import ResponseSpec
from litestar.params import FromPath, FromQuery, JSONBody, Parameter
from sqlalchemy.ext.asyncio import AsyncSession

from app import params, timeparams
from app.access import ADMINS, BOOKERS_FOR_OTHERS, PATIENTS, PUBLIC, Role, Viewer, only_roles
from app.accounts.controllers import parse_cursor, provide_accounts
from app.accounts.reads import timezone_of
from app.accounts.service import AccountService
from app.scheduling import reads
from app.scheduling.models import ClinicService, Schedule, SpecialtyRule, WaitlistRequest
from app.scheduling.schemas import (
    FeedSlotOut,
    HoldOut,
    RulesIn,
    RulesOut,
    ScheduleIn,
    ScheduleOut,
    ServiceIn,
    ServiceOut,
    SlotOut,
    SpecialistOut,
    SpecialtyOut,
    WaitlistIn,
    WaitlistOut,
    WaitlistResolveIn,
    WorkingHours,
)
from app.scheduling.service import FeedCache, RulesCache, SchedulingService
from app.schemas import Page
from app.services import scheduling_for
from app.specialties import TITLES, Specialty

Limit = Annotated[int, Parameter(ge=1, le=100)]
SCHEDULERS = (Role.ADMIN, Role.REGISTRAR)


async def provide_scheduling(db_session: NamedDependency[AsyncSession], state: State) -> SchedulingService:
    return scheduling_for(db_session, state)


DEPENDENCIES = {"scheduling": Provide(provide_scheduling), "accounts": Provide(provide_accounts)}


def etag_matches(if_none_match: str | None, etag: str) -> bool:
    if not if_none_match:
        return False
    tags = {t.strip().removeprefix("W/") for t in if_none_match.split(",")}
    return "*" in tags or etag in tags


def specialty_out(code: Specialty, rule: SpecialtyRule | None) -> SpecialtyOut:
    rules = RulesOut(min_age=rule.min_age, max_age=rule.max_age, sex=rule.sex) if rule else RulesOut(None, None, None)
    return SpecialtyOut(code=code.value, title=TITLES[code], rules=rules)


async def forget_rules(request: Request[Any, Any, Any]) -> None:
    """After the answer (so after the commit): a catalogue read racing the change may have cached the old rules."""
    request.app.state.specialty_rules_cache.clear()


def service_out(s: ClinicService) -> ServiceOut:
    return ServiceOut(id=s.id, specialty=s.specialty, title=s.title, duration_minutes=s.duration_minutes,
                      price=s.price, in_person_only=s.in_person_only, stage=s.stage)


def waitlist_out(w: WaitlistRequest) -> WaitlistOut:
    return WaitlistOut(id=w.id, patient_id=w.patient_id, requested_by=w.requested_by, specialty=w.specialty,
                       specialist_id=w.specialist_id, note=w.note, status=w.status, notified_at=w.notified_at,
                       created_at=w.created_at)


def schedule_out(s: Schedule, created: int, removed: int) -> ScheduleOut:
    return ScheduleOut(specialist_id=s.specialist_id, timezone=s.timezone, slot_minutes=s.slot_minutes,
                       horizon_days=s.horizon_days, weekly=[WorkingHours(**w) for w in s.weekly],
                       breaks=[WorkingHours(**b) for b in s.breaks], slots_created=created, slots_removed=removed)


class CatalogueController(Controller):
    path = "/api/v1"
    tags = ["scheduling"]
    dependencies = DEPENDENCIES  # resolved only for the handlers that name them

    @get("/specialties", opt=PUBLIC)
    async def list_specialties(self, state: State,
                               scheduling: NamedDependency[SchedulingService]) -> Page[SpecialtyOut]:
        """Public and polled: a cache hit touches no database."""
        cache: RulesCache = state.specialty_rules_cache
        page: Page[SpecialtyOut] | None = cache.get()
        if page is None:
            rules = await scheduling.specialty_rules()
            page = Page(items=[specialty_out(s, rules.get(s.value)) for s in Specialty])
            cache.put(page)
        return page

    @put("/specialties/{code:str}/rules", opt=only_roles(*ADMINS), after_response=forget_rules)
    async def set_specialty_rules(self, state: State, scheduling: NamedDependency[SchedulingService],
                                  code: FromPath[Specialty], data: JSONBody[RulesIn]) -> SpecialtyOut:
        """Whom a direction serves (age in whole years on the visit's day, sex); checked at every booking."""
        rule = await scheduling.set_specialty_rules(code, data)
        state.specialty_rules_cache.clear()  # and again once committed (forget_rules): no stale refill between
        return specialty_out(code, rule)

    @get("/services", opt=PUBLIC)
    async def list_services(self, scheduling: NamedDependency[SchedulingService],
                            specialty: FromQuery[Specialty | None] = None) -> Page[ServiceOut]:
        return Page(items=[service_out(s) for s in await scheduling.services(specialty)])

    @post("/services", status_code=201, opt=only_roles(Role.ADMIN))
    async def create_service(self, scheduling: NamedDependency[SchedulingService],
                             data: JSONBody[ServiceIn]) -> ServiceOut:
        return service_out(await scheduling.create_service(data))

    @get("/specialists", opt=PUBLIC)
    async def list_specialists(self, accounts: NamedDependency[AccountService],
                               specialty: FromQuery[Specialty | None] = None) -> Page[SpecialistOut]:
        return Page(items=[SpecialistOut(id=u.id, full_name=u.full_name, specialties=list(u.specialties),
                                         timezone=u.timezone) for u in await accounts.specialists(specialty)])

    @put("/specialists/{specialist_id:uuid}/schedule", opt=only_roles(*SCHEDULERS))
    async def set_schedule(self, scheduling: NamedDependency[SchedulingService],
                           accounts: NamedDependency[AccountService], specialist_id: FromPath[UUID],
                           data: JSONBody[ScheduleIn]) -> ScheduleOut:
        timeparams.zone(data.timezone)
        specialist = await accounts.specialist(specialist_id)
        schedule, created, removed = await scheduling.set_schedule(specialist, data)
        return schedule_out(schedule, created, removed)

    @get("/specialists/{specialist_id:uuid}/slots")
    async def list_slots(self, request: Request[Viewer, Any, Any], specialist_id: FromPath[UUID],
                         from_: params.From = None,
                         to: params.To = None, tz: params.Zone = None) -> Page[SlotOut]:
        state = request.app.state
        zone = timeparams.zone(tz or await timezone_of(state.database.reads, request.user.id,  # stored: just changed
                                                       state.settings.clinic_timezone))
        timeparams.answer_in(zone)
        start, end = timeparams.time_range(from_, to, zone)
        return Page(items=await reads.free_slots(state.database.reads, specialist_id, start, end))

    @post("/slots/{slot_id:uuid}/hold", status_code=201, opt=only_roles(*PATIENTS, *BOOKERS_FOR_OTHERS))
    async def hold_slot(self, request: Request[Viewer, Any, Any], scheduling: NamedDependency[SchedulingService],
                        slot_id: FromPath[UUID]) -> HoldOut:
        hold_id, until = await scheduling.hold(slot_id, request.user)
        return HoldOut(hold_id=hold_id, slot_id=slot_id, expires_at=until)

    @get("/slots/feed", opt=PUBLIC, responses={200: ResponseSpec(Page[FeedSlotOut], description="Free slots")})
    async def slot_feed(self, request: Request[Any, Any, Any], state: State,
                        specialty: FromQuery[Specialty | None] = None,
                        from_: params.From = None,
                        to: params.To = None) -> Response[bytes]:
        """Partners poll this: a cache hit touches no database; one query per cache window per question."""
        cache: FeedCache = state.slot_feed_cache
        key = (specialty, from_, to)
        cached = cache.get(key)
        if cached is None:
            start, end = timeparams.time_range(from_, to, timeparams.zone(state.settings.clinic_timezone))
            body = await reads.feed(state.database.reads, specialty, start, end)
            cached = body, cache.put(key, body)
        body, etag = cached
        headers = {"ETag": etag, "Cache-Control": f"public, max-age={int(cache.seconds)}"}
        if etag_matches(request.headers.get("if-none-match"), etag):
            return Response(b"", status_code=304, headers=headers)
        return Response(body, media_type="application/json", headers=headers)

    @post("/waitlist", status_code=201, opt=only_roles(*PATIENTS))
    async def join_waitlist(self, request: Request[Viewer, Any, Any], scheduling: NamedDependency[SchedulingService],
                            accounts: NamedDependency[AccountService], data: JSONBody[WaitlistIn]) -> WaitlistOut:
        patient_id = await accounts.acting_patient(request.user, data.patient_id)
        if data.specialist_id is not None:
            await accounts.specialist(data.specialist_id)
        return waitlist_out(await scheduling.add_to_waitlist(patient_id, request.user, data.specialty.value,
                                                             data.specialist_id, data.note))

    @get("/waitlist", opt=only_roles(*PATIENTS, *BOOKERS_FOR_OTHERS))
    async def list_waitlist(self, request: Request[Viewer, Any, Any], scheduling: NamedDependency[SchedulingService],
                            accounts: NamedDependency[AccountService],
                            status: FromQuery[Literal["open", "resolved", "withdrawn"] | None] = "open",
                            limit: FromQuery[Limit] = 50,
                            cursor: params.Cursor = None) -> Page[WaitlistOut]:
        """The front desk sees every request; a patient their own and their dependents'."""
        rows = await scheduling.waitlist(request.user, await accounts.patients_acted_for(request.user), status,
                                         limit, parse_cursor(cursor))
        return Page(items=[waitlist_out(w) for w in rows[:limit]],
                    next_cursor=str(rows[limit - 1].id) if len(rows) > limit else None)

    @delete("/waitlist/{request_id:uuid}", status_code=204, opt=only_roles(*PATIENTS))
    async def withdraw_from_waitlist(self, request: Request[Viewer, Any, Any],
                                     scheduling: NamedDependency[SchedulingService],
                                     accounts: NamedDependency[AccountService], request_id: FromPath[UUID]) -> None:
        """The patient withdraws their own (or a dependent's) request; it stays listed as withdrawn."""
        await scheduling.withdraw_from_waitlist(request_id, request.user,
                                                await accounts.patients_acted_for(request.user))

    @post("/waitlist/{request_id:uuid}/resolve", status_code=200, opt=only_roles(*BOOKERS_FOR_OTHERS))
    async def resolve_waitlist(self, request: Request[Viewer, Any, Any],
                               scheduling: NamedDependency[SchedulingService], request_id: FromPath[UUID],
                               data: JSONBody[WaitlistResolveIn]) -> WaitlistOut:
        return waitlist_out(await scheduling.resolve_waitlist(request_id, request.user, data.resolution))
