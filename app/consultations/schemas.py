"""What crosses the wire for consultations."""

from __future__ import annotations

import datetime as dt
from decimal import Decimal
from enum import StrEnum
from typing import Annotated, Any
from uuid import UUID

import msgspec
from msgspec import Meta

from app.accounts.schemas import Sex
from app.schemas import TEXT, Out, Wire

Icd10 = Annotated[str, Meta(min_length=1, max_length=16, examples=["E11.9"])]  # the format: the service
Text = Annotated[str, Meta(max_length=20_000, pattern=TEXT)]


class Format(StrEnum):
    IN_PERSON = "in_person"
    ONLINE = "online"


class Status(StrEnum):
    PENDING_CONFIRMATION = "pending_confirmation"
    CONFIRMED = "confirmed"
    IN_PROGRESS = "in_progress"
    COMPLETED = "completed"
    CANCELLED = "cancelled"
    NO_SHOW = "no_show"


class BookIn(Wire):
    slot_id: UUID
    service_id: UUID
    format: Format
    patient_id: UUID | None = None
    hold_id: UUID | None = None
    # registrars booking for a caller found by phone (a dependent by name under that phone)
    patient_phone: Annotated[str, Meta(max_length=40)] | None = None
    patient_name: Annotated[str, Meta(max_length=200)] | None = None
    dependent_name: Annotated[str, Meta(max_length=200)] | None = None
    # what the call centre learns on the phone, recorded on a card that lacks it (never overwriting the card):
    # directions with age or sex rules need it before the patient has opened the app
    patient_birth_date: dt.date | None = None
    patient_sex: Sex | None = None


class PatientBrief(Out):
    id: UUID
    full_name: str | None
    initials: str | None
    age: int | None
    is_dependent: bool | None


class ConsultationOut(Out):
    id: UUID
    patient_id: UUID
    specialist_id: UUID
    service_id: UUID
    slot_id: UUID
    specialty: str
    starts_at: dt.datetime
    ends_at: dt.datetime
    format: str
    status: str
    paid: bool
    conversation_id: UUID | None
    patient: PatientBrief | None = None


class CancelIn(Wire):
    reason: Annotated[str, Meta(max_length=500, pattern=TEXT)] | None = None


class PayIn(Wire):
    """A payment taken at the front desk: the service's price, by card, cash or transfer."""

    method: Annotated[str, Meta(max_length=16, pattern=r"^(card|cash|transfer)$")]  # online: through the provider
    reference: Annotated[str, Meta(min_length=1, max_length=128)]
    # the service's price (checked, or taken when absent); above 0, at most 10,000,000, at most kopecks
    amount: Decimal | None = None


class DiagnosisIn(Wire):
    code: Icd10
    title: Annotated[str, Meta(min_length=1, max_length=500)]
    main: bool = False


class AnalysisStatus(StrEnum):
    ORDERED = "ordered"
    SAMPLE_TAKEN = "sample_taken"
    READY = "ready"


class AnalysisOrderIn(Wire):
    name: Annotated[str, Meta(min_length=1, max_length=300)]
    expected_ready_on: dt.date | None = None
    status: AnalysisStatus = AnalysisStatus.ORDERED


class FollowUpIn(Wire):
    service_id: UUID | None = None
    after_days: Annotated[int, Meta(ge=1, le=730)] | None = None
    note: Annotated[str, Meta(max_length=1000)] = ""


class ConclusionIn(Wire):
    diagnoses: Annotated[list[DiagnosisIn], Meta(max_length=30)] = msgspec.field(default_factory=list)
    recommendations: Text = ""
    treatment: Text = ""
    analysis_orders: Annotated[list[AnalysisOrderIn], Meta(max_length=50)] = msgspec.field(default_factory=list)
    follow_up: FollowUpIn | None = None


class AnalysisOrderOut(Out):
    id: UUID
    name: str
    status: str
    expected_ready_on: dt.date | None


class ConclusionOut(Out):
    id: UUID
    consultation_id: UUID
    patient_id: UUID
    author_id: UUID
    diagnoses: list[dict[str, Any]]
    recommendations: str
    treatment: str
    analysis_orders: list[AnalysisOrderOut]
    follow_up: dict[str, Any] | None
    created_at: dt.datetime


class AnalysisStatusIn(Wire):
    status: AnalysisStatus


class RatingIn(Wire):
    score: Annotated[int, Meta(ge=1, le=5)]
    comment: Annotated[str, Meta(max_length=2000, pattern=TEXT)] | None = None


class RatingOut(Out):
    consultation_id: UUID
    specialist_id: UUID
    score: int
    comment: str | None
    created_at: dt.datetime


class MyPatientOut(Out):
    patient: PatientBrief
    next_consultation: ConsultationOut | None
    last_consultation_at: dt.datetime | None
    tz_offset_minutes: int | None
