"""What crosses the wire for accounts."""

from __future__ import annotations

import datetime as dt
from enum import StrEnum
from typing import Annotated, Any, Literal
from uuid import UUID

import msgspec
from msgspec import UNSET, Meta, UnsetType

from app.access import Role
from app.schemas import PUSH_TOKEN_CHARS, TEXT, Out, Wire
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


class Sex(StrEnum):
    FEMALE = "female"
    MALE = "male"


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
    active: bool  # false: deactivated by an admin, cannot sign in


class DependentOut(Out):
    id: UUID
    full_name: str
    birth_date: dt.date | None
    sex: str | None
    relation: str | None
    legal_basis: str | None


class MeOut(UserOut):
    birth_date: dt.date | None
    sex: str | None
    questionnaire: dict[str, Any]
    dependents: list[DependentOut]
    quiet_hours_start: str | None = None
    quiet_hours_end: str | None = None
    push_topics: list[str] = msgspec.field(default_factory=list)  # the pushes this account gets


class TokenOut(Out):
    access_token: str
    refresh_token: str
    expires_in: int
    user: UserOut
    token_type: Literal["Bearer"] = "Bearer"  # noqa: S105  (a scheme name, not a secret)


# A questionnaire is answers to a form: short values, one level deep. Each piece is bounded, and so is the whole
# (QUESTIONNAIRE_MAX_BYTES encoded), so no account can be made to carry megabytes into every card read.
QUESTIONNAIRE_MAX_BYTES = 32_768
AnswerText = Annotated[str, Meta(max_length=2000, pattern=TEXT)]
QuestionnaireValue = AnswerText | int | float | bool | None | Annotated[list[Annotated[str, Meta(max_length=200)]],
                                                                        Meta(max_length=50)]


# quiet hours: local times "HH:MM" in the user's time zone; start after end spans midnight ("22:00"-"08:00")
QuietTime = Annotated[str, Meta(min_length=5, max_length=5, pattern=r"^([01][0-9]|2[0-3]):[0-5][0-9]$",
                                 examples=["22:00"])]
PushTopic = Literal["chat", "consultations", "notices", "alerts", "reminders"]  # app/notifications/models.py


class MePatch(Wire):
    full_name: Name | UnsetType = UNSET
    birth_date: dt.date | UnsetType = UNSET
    sex: Sex | UnsetType = UNSET
    timezone: TimezoneName | UnsetType = UNSET
    # no non-urgent push between them (held until the end); both set, or both null for none
    quiet_hours_start: QuietTime | UnsetType | None = UNSET
    quiet_hours_end: QuietTime | UnsetType | None = UNSET
    # staff: the pushes they want (null: the default, chat and alerts); patients get every push
    push_topics: Annotated[list[PushTopic], Meta(max_length=5)] | UnsetType | None = UNSET
    questionnaire: Annotated[dict[Annotated[str, Meta(max_length=100)], QuestionnaireValue],
                             Meta(max_length=200)] | UnsetType = UNSET

    def __post_init__(self) -> None:
        if self.questionnaire is not UNSET and len(msgspec.json.encode(self.questionnaire)) > QUESTIONNAIRE_MAX_BYTES:
            raise ValueError(f"questionnaire: at most {QUESTIONNAIRE_MAX_BYTES} bytes of answers in all")


class DependentIn(Wire):
    full_name: Name
    birth_date: dt.date
    relation: Relation
    legal_basis: Annotated[str, Meta(min_length=3, max_length=500,
                                     examples=["birth certificate II-AB 123456"])]
    sex: Sex | None = None


class StaffIn(Wire):
    phone: PhoneText
    full_name: Name
    role: Role
    specialties: Annotated[list[Specialty], Meta(max_length=8)] = msgspec.field(default_factory=list)


class StaffPatch(Wire):
    """What an admin changes of a staff account; every change ends the account's current access tokens."""

    active: Annotated[bool, Meta(description="false deactivates: tokens and sockets stop within seconds")] \
        | UnsetType = UNSET
    roles: Annotated[list[Role], Meta(min_length=1, max_length=8, examples=[["doctor"]])] | UnsetType = UNSET
    specialties: Annotated[list[Specialty], Meta(max_length=8, examples=[["endocrinology"]])] | UnsetType = UNSET


class PatientCardOut(Out):
    """A patient as the caller may see them: masked fields are null, never missing."""

    id: UUID | None
    full_name: str | None
    initials: str | None
    birth_date: dt.date | None
    age: int | None
    sex: str | None
    is_dependent: bool | None
    phone: str | None
    timezone: str | None
    guardian_id: UUID | None
    questionnaire: dict[str, Any] | None


class DeviceIn(Wire):
    platform: Literal["android", "ios", "web"]
    push_token: Annotated[str, Meta(min_length=1, max_length=4096, pattern=PUSH_TOKEN_CHARS)]
    voip_token: Annotated[str, Meta(min_length=1, max_length=4096, pattern=PUSH_TOKEN_CHARS)] | None = None


class DeviceOut(Out):
    id: UUID
    platform: str
    has_voip: bool
    created_at: dt.datetime
