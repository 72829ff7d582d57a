"""What crosses the wire for scheduling."""

from __future__ import annotations

import datetime as dt
from decimal import Decimal
from enum import StrEnum
from typing import Annotated
from uuid import UUID

import msgspec
from msgspec import Meta

from app.accounts.schemas import Sex
from app.schemas import TEXT, Out, Wire
from app.specialties import Specialty

ClockTime = Annotated[str, Meta(max_length=5, pattern=r"^([01][0-9]|2[0-3]):[0-5][0-9]$|^24:00$", examples=["09:00"])]
Weekday = Annotated[int, Meta(ge=0, le=6, description="Monday 0 ... Sunday 6")]


class Stage(StrEnum):
    FIRST = "first"
    SECOND = "second"
    SINGLE = "single"


Age = Annotated[int, Meta(ge=0, le=130, description="whole years on the day of the visit")]


class RulesIn(Wire):
    """Whom a direction serves; null (or absent) is no limit."""

    min_age: Age | None = None
    max_age: Age | None = None
    sex: Sex | None = None


class RulesOut(Out):
    min_age: int | None
    max_age: int | None
    sex: str | None


class SpecialtyOut(Out):
    code: str
    title: str
    rules: RulesOut


class ServiceIn(Wire):
    specialty: Specialty
    title: Annotated[str, Meta(min_length=1, max_length=200, pattern=TEXT)]
    duration_minutes: Annotated[int, Meta(ge=5, le=480)]
    price: Decimal  # checked by the service: 0 to 10,000,000 with at most kopecks
    in_person_only: bool = False
    stage: Stage = Stage.SINGLE


class ServiceOut(Out):
    id: UUID
    specialty: str
    title: str
    duration_minutes: int
    price: Decimal
    in_person_only: bool
    stage: str


class SpecialistOut(Out):
    id: UUID
    full_name: str
    specialties: list[str]
    timezone: str


class WorkingHours(Wire):
    weekday: Weekday
    start: ClockTime
    end: ClockTime


class ScheduleIn(Wire):
    timezone: Annotated[str, Meta(min_length=1, max_length=64)]
    slot_minutes: Annotated[int, Meta(ge=10, le=240)]
    horizon_days: Annotated[int, Meta(ge=1, le=180)]
    weekly: Annotated[list[WorkingHours], Meta(max_length=70)]
    breaks: Annotated[list[WorkingHours], Meta(max_length=70)] = msgspec.field(default_factory=list)


class ScheduleOut(Out):
    specialist_id: UUID
    timezone: str
    slot_minutes: int
    horizon_days: int
    weekly: list[WorkingHours]
    breaks: list[WorkingHours]
    slots_created: int
    slots_removed: int


class SlotOut(Out):
    id: UUID
    specialist_id: UUID
    starts_at: dt.datetime
    ends_at: dt.datetime


class FeedSlotOut(Out):
    id: UUID
    specialist_id: UUID
    specialties: list[str]
    starts_at: dt.datetime
    ends_at: dt.datetime


class HoldOut(Out):
    hold_id: UUID
    slot_id: UUID
    expires_at: dt.datetime


class WaitlistIn(Wire):
    specialty: Specialty
    patient_id: UUID | None = None
    specialist_id: UUID | None = None
    note: Annotated[str, Meta(max_length=1000, pattern=TEXT)] = ""


class WaitlistOut(Out):
    id: UUID
    patient_id: UUID
    requested_by: UUID
    specialty: str
    specialist_id: UUID | None
    note: str
    status: str
    notified_at: dt.datetime | None
    created_at: dt.datetime


class WaitlistResolveIn(Wire):
    resolution: Annotated[str, Meta(max_length=1000, pattern=TEXT)] = ""
