"""Wire types shared by every domain: the strict base Struct and the one page shape."""

from __future__ import annotations

import datetime as dt
from decimal import Decimal
from typing import Generic, TypeVar, get_args

import msgspec

from app.timeparams import answer_zone

T = TypeVar("T")


# Free text a person writes: anything but NUL, which PostgreSQL cannot store (it would fail the write, and a chat
# send group with it); printable ASCII for the tokens push services issue.
TEXT = r"^[^\x00]*$"
PUSH_TOKEN_CHARS = r"^[\x21-\x7e]+$"  # noqa: S105 (a pattern, not a secret)


class Wire(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """What clients send: unknown fields are refused, so a typo is a 422, not a silent no-op."""


class Out(msgspec.Struct, kw_only=True):
    """What the service answers. Its times carry the caller's offset (API.md: ISO 8601 with offset): a request
    sets its zone once (app/timeparams.py) and every answer built within it converts its own datetime fields."""

    def __post_init__(self) -> None:
        names = _TIME_FIELDS.get(type(self))
        if names is None:
            names = _TIME_FIELDS[type(self)] = time_fields(type(self))
        if not names:  # most answers' parts (a patient's brief card, a page) hold no time
            return
        tz = answer_zone()
        if tz is None:
            return
        for name in names:
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, value.astimezone(tz))


_TIME_FIELDS: dict[type, tuple[str, ...]] = {}
AnswerT = TypeVar("AnswerT", bound=Out)


def localized(out: AnswerT) -> AnswerT:
    """A copy in this request's zone, of an answer built elsewhere (the send queue builds messages in UTC)."""
    return msgspec.structs.replace(out)


def time_fields(cls: type[msgspec.Struct]) -> tuple[str, ...]:
    """The fields of a Struct that hold a datetime (or None)."""
    return tuple(f.name for f in msgspec.structs.fields(cls)
                 if f.type is dt.datetime or dt.datetime in get_args(f.type))


class Page(Out, Generic[T]):
    items: list[T]
    next_cursor: str | None = None


def money_ok(amount: Decimal, allow_zero: bool = True) -> bool:
    """A finite amount in roubles and kopecks within what a clinic charges."""
    if not amount.is_finite() or amount.as_tuple().exponent < -2:  # type: ignore[operator]
        return False
    return (amount >= 0 if allow_zero else amount > 0) and amount <= 10_000_000
