"""What crosses the wire for accounts."""

from __future__ import annotations

import datetime as dt
from enum import StrEnum
from typing import Annotated, Any, Literal
from uuid import UUID

import msgspec
from msgspec import UNSET, Meta, UnsetType

from app.access import Role
from app.schemas import Out, Wire
from app.specialties import Specialty

PhoneText = Annotated[str, Meta(min_length=1, max_length=40, description="any common way of writing a phone")]
Name = Annotated[str, Meta(min_length=1, max_length=200)]
TimezoneName = Annotated[str, Meta(min_length=1, max_length=64, examples=["Europe/Moscow"])]


class Relation(StrEnum):
    CHILD = "child"
    PARENT = "parent"
    SPOUSE = "spouse"
    WARD = "ward"  # an adult without legal capacity under guardianship
    OTHER_RELATIVE = "other_relative"


class OtpIn(Wire):
    phone: PhoneText


class OtpOut(Out):
    expires_in: int


class TokenIn(Wire):
    phone: PhoneText
    code: Annotated[str, Meta(min_length=1, max_length=16)]


class RefreshIn(Wire):
    refresh_token: Annotated[str, Meta(min_length=1, max_length=200)]


class LogoutIn(Wire):
    refresh_token: Annotated[str, Meta(min_length=1, max_length=200)] | None = None


class UserOut(Out):
    id: UUID
    phone: str | None
    full_name: str
    roles: list[str]
    specialties: list[str]
    timezone: str


class DependentOut(Out):
    id: UUID
    full_name: str
    birth_date: dt.date | None
    relation: str | None
    legal_basis: str | None


class MeOut(UserOut):
    birth_date: dt.date | None
    questionnaire: dict[str, Any]
    dependents: list[DependentOut]


class TokenOut(Out):
    access_token: str
    refresh_token: str
    expires_in: int
    user: UserOut
    token_type: Literal["Bearer"] = "Bearer"  # noqa: S105  (a scheme name, not a secret)


QuestionnaireValue = str | int | float | bool | None | list[str]


class MePatch(Wire):
    full_name: Name | UnsetType = UNSET
    birth_date: dt.date | UnsetType = UNSET
    timezone: TimezoneName | UnsetType = UNSET
    questionnaire: Annotated[dict[Annotated[str, Meta(max_length=100)], QuestionnaireValue],
                             Meta(max_length=200)] | UnsetType = UNSET


class DependentIn(Wire):
    full_name: Name
    birth_date: dt.date
    relation: Relation
    legal_basis: Annotated[str, Meta(min_length=3, max_length=500,
                                     examples=["birth certificate II-AB 123456"])]


class StaffIn(Wire):
    phone: PhoneText
    full_name: Name
    role: Role
    specialties: Annotated[list[Specialty], Meta(max_length=8)] = msgspec.field(default_factory=list)


class PatientCardOut(Out):
    """A patient as the caller may see them: masked fields are null, never missing."""

    id: UUID | None
    full_name: str | None
    initials: str | None
    birth_date: dt.date | None
    age: int | None
    is_dependent: bool | None
    phone: str | None
    timezone: str | None
    guardian_id: UUID | None
    questionnaire: dict[str, Any] | None


class DeviceIn(Wire):
    platform: Literal["android", "ios", "web"]
    push_token: Annotated[str, Meta(min_length=1, max_length=4096)]
    voip_token: Annotated[str, Meta(min_length=1, max_length=4096)] | None = None


class DeviceOut(Out):
    id: UUID
    platform: str
    has_voip: bool
    created_at: dt.datetime
