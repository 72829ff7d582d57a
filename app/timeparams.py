"""Query-string times: a date in the caller's zone (YYYY-MM-DD) or an ISO 8601 instant."""

from __future__ import annotations

import datetime as dt
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from app.errors import Invalid

MAX_RANGE = dt.timedelta(days=93)


def zone(name: str) -> ZoneInfo:
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise Invalid("unknown time zone", "timezone_invalid") from exc


def parse_instant(value: str, tz: ZoneInfo, end_of_day: bool = False) -> dt.datetime:
    try:
        if len(value) == 10:
            day = dt.date.fromisoformat(value)
            midnight = dt.datetime.combine(day + dt.timedelta(days=1 if end_of_day else 0), dt.time(), tzinfo=tz)
            return midnight.astimezone(dt.UTC)
        instant = dt.datetime.fromisoformat(value)
    except ValueError as exc:
        raise Invalid(f"{value!r} is neither a date nor an instant", "time_invalid") from exc
    if instant.tzinfo is None:
        instant = instant.replace(tzinfo=tz)
    return instant.astimezone(dt.UTC)


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
