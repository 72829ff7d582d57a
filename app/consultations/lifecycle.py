"""The consultation state machine in one table: what each command changes, who may run it, and when."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass

from app.access import Role, Viewer
from app.consultations.models import Consultation
from app.consultations.schemas import Status

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
    # None when the time is right, else the reason code of the refusal
    timing: Callable[[Consultation, dt.datetime], str | None]


def _any_time(_: Consultation, __: dt.datetime) -> str | None:
    return None


def _before_end(c: Consultation, now: dt.datetime) -> str | None:
    return None if now < c.ends_at else "slot_over"  # taking a patient early is allowed, late is not


def _before_start(c: Consultation, now: dt.datetime) -> str | None:
    return None if now < c.starts_at else "already_started"


def _after_start(c: Consultation, now: dt.datetime) -> str | None:
    return None if now >= c.starts_at else "not_started_yet"


TRANSITIONS: dict[str, Transition] = {
    "confirm": Transition(frozenset({S.PENDING_CONFIRMATION}), S.CONFIRMED, lambda p: p.is_front_desk, _any_time),
    "start": Transition(frozenset({S.CONFIRMED}), S.IN_PROGRESS, lambda p: p.is_specialist, _before_end),
    "complete": Transition(frozenset({S.IN_PROGRESS}), S.COMPLETED, lambda p: p.is_specialist, _any_time),
    "cancel": Transition(frozenset({S.PENDING_CONFIRMATION, S.CONFIRMED}), S.CANCELLED,
                         lambda p: p.for_patient or p.is_front_desk, _before_start),
    "no_show": Transition(frozenset({S.CONFIRMED}), S.NO_SHOW, lambda p: p.is_specialist or p.is_front_desk,
                          _after_start),
}

# entering one of these opens the consultation's chat window; entering an ending state closes it
OPEN_FOR_CHAT = frozenset({S.CONFIRMED, S.IN_PROGRESS})
ENDED = frozenset({S.COMPLETED, S.CANCELLED, S.NO_SHOW})
