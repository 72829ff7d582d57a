"""The consultation state machine in one table: what each command changes, who may run it, and when."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass

from app.access import Role, Viewer
from app.consultations.models import Consultation
from app.consultations.schemas import Status
from app.settings import Settings

S = Status


@dataclass(frozen=True, slots=True)
class Party:
    """How the caller stands to a consultation."""

    viewer: Viewer
    is_specialist: bool  # the consultation's own specialist
    for_patient: bool  # the patient or their guardian

    @property
    def is_front_desk(self) -> bool:
        return self.viewer.has_any((Role.REGISTRAR, Role.ADMIN))


@dataclass(frozen=True, slots=True)
class Transition:
    sources: frozenset[Status]
    target: Status
    may: Callable[[Party], bool]
    # None when the time is right, else the reason code of the refusal (worded in TIMING_DETAILS)
    timing: Callable[[Consultation, dt.datetime, Settings], str | None]
    verb: str  # for messages: "you may not <verb>"
    past: str  # "... cannot be <past>"


def _any_time(_: Consultation, __: dt.datetime, ___: Settings) -> str | None:
    return None


def _near_start(c: Consultation, now: dt.datetime, settings: Settings) -> str | None:
    """From a few minutes before the slot (a patient who came early) until its end; never hours ahead."""
    if now < c.starts_at - dt.timedelta(minutes=settings.start_early_minutes):
        return "too_early_to_start"
    return None if now < c.ends_at else "slot_over"


def _before_start(c: Consultation, now: dt.datetime, _: Settings) -> str | None:
    return None if now < c.starts_at else "already_started"


def _after_start(c: Consultation, now: dt.datetime, _: Settings) -> str | None:
    return None if now >= c.starts_at else "not_started_yet"


TRANSITIONS: dict[str, Transition] = {
    "confirm": Transition(frozenset({S.PENDING_CONFIRMATION}), S.CONFIRMED, lambda p: p.is_front_desk, _any_time,
                          "confirm this consultation", "confirmed"),
    "start": Transition(frozenset({S.CONFIRMED}), S.IN_PROGRESS, lambda p: p.is_specialist, _near_start,
                        "start this consultation", "started"),
    "complete": Transition(frozenset({S.IN_PROGRESS}), S.COMPLETED, lambda p: p.is_specialist, _any_time,
                           "complete this consultation", "completed"),
    "cancel": Transition(frozenset({S.PENDING_CONFIRMATION, S.CONFIRMED}), S.CANCELLED,
                         lambda p: p.for_patient or p.is_front_desk, _before_start,
                         "cancel this consultation", "cancelled"),
    "no_show": Transition(frozenset({S.CONFIRMED}), S.NO_SHOW, lambda p: p.is_specialist or p.is_front_desk,
                          _after_start, "mark this consultation as a no-show", "marked as a no-show"),
}

# a consultation in this status ...: the messages of refused commands
STATUS_PHRASES: dict[str, str] = {
    S.PENDING_CONFIRMATION: "awaiting confirmation", S.CONFIRMED: "already confirmed",
    S.IN_PROGRESS: "in progress", S.COMPLETED: "already completed", S.CANCELLED: "already cancelled",
    S.NO_SHOW: "marked as a no-show",
}

TIMING_DETAILS: dict[str, str] = {
    "too_early_to_start": "too early to start: a visit starts at most {early} minutes before its time",
    "slot_over": "too late: the consultation's time is over",
    "already_started": "too late: the consultation's time has begun",
    "not_started_yet": "too early: the consultation's time has not begun",
}

# entering one of these opens the consultation's chat window; entering an ending state closes it
OPEN_FOR_CHAT = frozenset({S.CONFIRMED, S.IN_PROGRESS})
ENDED = frozenset({S.COMPLETED, S.CANCELLED, S.NO_SHOW})
