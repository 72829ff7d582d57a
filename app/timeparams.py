"""Query-string times: a date in the caller's zone (YYYY-MM-DD) or an ISO 8601 instant.

Every time a client sends is checked here before it reaches arithmetic or a query: at most a few dozen
characters, a known zone, and inside the years a clinic's calendar can hold (datetime overflows near
year 1 and 9999, and a date that far is a probe, never a booking).
"""

from __future__ import annotations

import contextlib
import datetime as dt
from collections.abc import Iterator
from contextvars import ContextVar
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from litestar import Request

from app.access import Viewer
from app.errors import Invalid

MAX_RANGE = dt.timedelta(days=93)
EARLIEST = dt.datetime(2000, 1, 1, tzinfo=dt.UTC)  # before any record the clinic has
LATEST = dt.datetime(2100, 1, 1, tzinfo=dt.UTC)  # beyond any horizon a schedule or a chat extension reaches
MAX_TEXT = 64  # "2026-12-01T10:00:00.000000+03:00" is 32; a zone name is at most about 40


def zone(name: str) -> ZoneInfo:
    if not name or len(name) > MAX_TEXT:
        raise Invalid("unknown time zone: give an IANA name such as Europe/Moscow", "timezone_invalid")
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, OSError) as exc:  # OSError: a name the file system refuses
        raise Invalid("unknown time zone: give an IANA name such as Europe/Moscow", "timezone_invalid") from exc


def in_window(instant: dt.datetime, written_year: int | None = None) -> dt.datetime:
    """The instant in UTC, refused when outside the years 2000 to 2099: in UTC, and in the year the caller wrote
    (2100-01-01 in Moscow is still 2099 in UTC)."""
    if not EARLIEST <= instant < LATEST or (written_year is not None and not
                                            EARLIEST.year <= written_year < LATEST.year):
        raise Invalid("times must fall between the years 2000 and 2099", "time_out_of_range")
    return instant.astimezone(dt.UTC)


def parse_instant(value: str, tz: ZoneInfo, end_of_day: bool = False) -> dt.datetime:
    """A date (midnight in `tz`; with end_of_day the next midnight) or an instant (zone-less: in `tz`), in UTC."""
    if len(value) > MAX_TEXT:
        raise Invalid("a time is a date (YYYY-MM-DD) or an ISO 8601 instant", "time_invalid")
    try:
        if len(value) == 10:
            day = dt.date.fromisoformat(value)
            midnight = dt.datetime.combine(day + dt.timedelta(days=1 if end_of_day else 0), dt.time(), tzinfo=tz)
            return in_window(midnight, day.year)  # a `to` of 2099-12-31 ends at midnight in 2100: still fine
        instant = dt.datetime.fromisoformat(value)
        if instant.tzinfo is None:
            instant = instant.replace(tzinfo=tz)
        return in_window(instant, instant.year)
    except OverflowError as exc:  # a day after 9999-12-31, or an offset that moves it past year 1 or 9999
        raise Invalid("times must fall between the years 2000 and 2099", "time_out_of_range") from exc
    except ValueError as exc:
        raise Invalid("a time is a date (YYYY-MM-DD) or an ISO 8601 instant", "time_invalid") from exc


def parse_aware(value: str) -> dt.datetime:
    """An ISO 8601 instant that names its offset (cursors and the like: no zone to assume), in UTC."""
    if len(value) > MAX_TEXT:
        raise Invalid("a time is an ISO 8601 instant with an offset", "time_invalid")
    try:
        instant = dt.datetime.fromisoformat(value)
    except ValueError as exc:
        raise Invalid("a time is an ISO 8601 instant with an offset", "time_invalid") from exc
    if instant.tzinfo is None or instant.utcoffset() is None:
        raise Invalid("a time must carry its offset, e.g. 2026-12-01T10:00:00+03:00", "time_zone_missing")
    try:
        return in_window(instant, instant.year)
    except OverflowError as exc:  # "9999-12-31T23:59:59-14:00" is past the end of datetime in UTC
        raise Invalid("times must fall between the years 2000 and 2099", "time_out_of_range") from exc


def time_range(start: str | None, end: str | None, tz: ZoneInfo, default_days: int = 7) -> tuple[dt.datetime,
                                                                                                   dt.datetime]:
    """[from, to) in UTC; a date `to` includes that whole day."""
    begin = parse_instant(start, tz) if start else dt.datetime.now(dt.UTC)
    finish = parse_instant(end, tz, end_of_day=True) if end else begin + dt.timedelta(days=default_days)
    if finish <= begin:
        raise Invalid("`to` must come after `from`", "time_range_invalid")
    if finish - begin > MAX_RANGE:
        raise Invalid("at most 93 days at once", "time_range_too_long")
    return begin, finish


# The zone this request's answers speak in. Set once per request from the token (no query), read by every Out
# Struct as it is built (app/schemas.py). Unset outside a request: events shared by many readers stay in UTC.
_answer_zone: ContextVar[ZoneInfo | None] = ContextVar("answer_zone", default=None)


def answer_zone() -> ZoneInfo | None:
    return _answer_zone.get()


def answer_in(tz: ZoneInfo) -> None:
    """For the rest of this request, answer in `tz` (a route that read the caller's stored zone anyway)."""
    _answer_zone.set(tz)


@contextlib.contextmanager
def answers_in(tz: ZoneInfo | None) -> Iterator[None]:
    """Build answers in `tz` (None: UTC) for a while, e.g. an event payload built during a request."""
    token = _answer_zone.set(tz)
    try:
        yield
    finally:
        _answer_zone.reset(token)


async def set_answer_zone(request: Request[Any, Any, Any]) -> None:
    """before_request: the caller's zone from the access token (else the clinic's), or `tz=` where a route takes it.

    Public routes answer in the clinic's zone: what they answer may be cached and shared (the slot feed)."""
    settings = request.app.state.settings
    user = request.scope.get("user")
    name = user.timezone if isinstance(user, Viewer) and user.timezone else settings.clinic_timezone
    if "tz" in request.route_handler.parsed_fn_signature.parameters:  # the query is parsed only where it counts
        name = request.query_params.get("tz") or name  # empty: not given
    _answer_zone.set(zone(name))
